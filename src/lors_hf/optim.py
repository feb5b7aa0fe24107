"""Optimizer parameter groups for LORS models: the private ``lors_B`` learn faster; the stack has its own rate.

``B`` starts at zero (the paper's init), so early on a layer's private residual ``B_i @ A_i`` moves only
as fast as ``B`` does. With one learning rate for everything, a LORS model trained from scratch kept
following the fully shared model (``scripts/bench_scratch.py --preset long``). Giving ``B`` a larger
learning rate than ``A`` and the shared weight (as LoRA+ does for LoRA) lets the private parts grow.

A shared weight, on the other hand, moves all N layers of its stack with each step. At the learning rate
that suits the dense model (and the rest of the LORS model: embeddings, norms, biases), the stack did better
at half of it: ``stack_lr_ratio=0.5`` (``scripts/bench_scratch.py --preset long --lr 4e-3 --b-lr-ratio 8
--stack-lr-ratio 0.5``; in seed-0 probes 0.35, 0.7 and 1 did worse). The default stays 1 (one learning rate
for the stack and the rest) because the best ratio depends on how the base learning rate was chosen.

Both ratios are for training from scratch: on a converted pretrained model (``B`` from the SVD) they did
worse than one learning rate (the MiniLM demo, README).

Example:
    >>> import torch
    >>> from lors_hf import lorsify, lors_parameter_groups
    >>> model = lorsify(model, init="scratch", target_reduction=0.6)  # doctest: +SKIP
    >>> optimizer = torch.optim.AdamW(lors_parameter_groups(model, lr=2e-3, weight_decay=0.1))  # doctest: +SKIP
    >>> groups = lors_parameter_groups(model, lr=4e-3, weight_decay=0.1, stack_lr_ratio=0.5)  # doctest: +SKIP

With the ``Trainer``, pass ``optimizers=(optimizer, None)``: its scheduler scales every group's own
learning rate, so the ratio holds throughout the schedule.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import nn

from .layer import SharedWeight
from .surgery import check_model

DEFAULT_B_LR_RATIO = 8.0
"""From ``scripts/bench_scratch.py --preset long --b-lr-ratio 8`` (LORS-60 went from +6.0% to -0.1% perplexity
against dense, both at peak lr 2e-3; a dense model at 4e-3 stays ahead); 16 did a little worse than 8 in
a one-seed probe. Not tuned further."""


def lors_parameter_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    b_lr_ratio: float = DEFAULT_B_LR_RATIO,
    stack_lr_ratio: float = 1.0,
) -> list[dict[str, Any]]:
    """Parameter groups for a torch optimizer: ``lors_B`` learns `b_lr_ratio` times faster than the stack.

    Learning rates: the shared weights and ``lors_A`` at ``stack_lr_ratio * lr``; ``lors_B`` at
    ``stack_lr_ratio * b_lr_ratio * lr``; everything else (embeddings, norms, biases, heads, layers outside a
    LORS stack) at `lr`. A shared weight moves all N layers of its stack at once, so a learning rate
    that suits the rest of the model can be too large for it: from scratch at the dense model's best
    learning rate, ``stack_lr_ratio=0.5`` did better than 1 (``scripts/bench_scratch.py --preset long``).

    Matrices (``ndim >= 2``) get `weight_decay`; biases and norms get none. Every trainable parameter
    appears in exactly one group (a shared weight once), except the empty ``lors_A`` / ``lors_B`` of rank-0
    layers; empty groups are left out.

    Raises:
        TypeError: `model` is not an ``nn.Module`` (e.g. a checkpoint path), or a number given is not one.
        ValueError: `model` has no LORS layer with a private rank (call `lorsify` first, or use plain
            parameter groups), `lr`, `b_lr_ratio` or `stack_lr_ratio` is not a finite positive number, or
            `weight_decay` is not a finite number >= 0.

    Example:
        >>> groups = lors_parameter_groups(model, lr=1e-3, weight_decay=0.01)  # doctest: +SKIP
        >>> sorted(g["lr"] for g in groups)  # doctest: +SKIP
        [0.001, 0.001, 0.001, 0.008]
    """
    check_model(model, "lors_parameter_groups")
    numbers_given = {"lr": lr, "b_lr_ratio": b_lr_ratio, "stack_lr_ratio": stack_lr_ratio, "weight_decay": weight_decay}
    for name, value in numbers_given.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"lors_parameter_groups: {name} must be a number, got {value!r} ({type(value).__name__}).")
    rates = (lr, b_lr_ratio, stack_lr_ratio)
    if not all(0 < rate < math.inf for rate in rates):
        raise ValueError(f"lors_parameter_groups: lr, b_lr_ratio and stack_lr_ratio must be finite positive numbers "
                         f"(got lr={lr!r}, b_lr_ratio={b_lr_ratio!r}, stack_lr_ratio={stack_lr_ratio!r}).")
    if not 0 <= weight_decay < math.inf:
        raise ValueError(f"lors_parameter_groups: weight_decay must be a finite number >= 0 (e.g. 0.01, or 0 for "
                         f"none), got {weight_decay!r}.")
    shared_ids = {id(module.weight) for module in model.modules() if isinstance(module, SharedWeight)}
    decay, no_decay, stack, private_b = [], [], [], []
    for name, param in model.named_parameters():  # named_parameters yields a shared weight once
        if not param.requires_grad:
            continue
        kind = name.rsplit(".", 1)[-1]
        if kind == "lors_B":
            if param.numel():
                private_b.append(param)
        elif kind == "lors_A" or id(param) in shared_ids:
            if param.numel():
                stack.append(param)
        elif param.ndim >= 2:
            decay.append(param)
        else:
            no_decay.append(param)
    if not private_b:
        raise ValueError(
            "lors_parameter_groups: the model has no trainable LORS layer with a private rank (no `lors_B` "
            "with rank > 0); call lorsify(model, ...) first, or build plain parameter groups for a dense model."
        )
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"params": stack, "lr": lr * stack_lr_ratio, "weight_decay": weight_decay},
        {"params": private_b, "lr": lr * stack_lr_ratio * b_lr_ratio, "weight_decay": weight_decay},
    ]
    return [group for group in groups if group["params"]]
