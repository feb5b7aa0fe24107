"""Optimizer parameter groups for LORS models: the private ``lors_B`` factors learn faster.

``B`` starts at zero (the paper's init), so early on a layer's private residual ``B_i @ A_i`` moves only
as fast as ``B`` does. With one learning rate for everything, a LORS model trained from scratch kept
following the fully shared model (``scripts/bench_scratch.py --preset long``). Giving ``B`` a larger
learning rate than ``A`` and the shared weight (as LoRA+ does for LoRA) lets the private parts grow.

Example:
    >>> import torch
    >>> from lors_hf import lorsify, lors_parameter_groups
    >>> model = lorsify(model, init="scratch", target_reduction=0.6)  # doctest: +SKIP
    >>> optimizer = torch.optim.AdamW(lors_parameter_groups(model, lr=2e-3, weight_decay=0.1))  # doctest: +SKIP

With the ``Trainer``, pass ``optimizers=(optimizer, None)``: its scheduler scales every group's own
learning rate, so the ratio holds throughout the schedule.
"""

from __future__ import annotations

from typing import Any

from torch import nn

DEFAULT_B_LR_RATIO = 8.0
"""From ``scripts/bench_scratch.py --preset long --b-lr-ratio 8`` (LORS-60 went from +6.0% to -0.1% perplexity
against dense, both at peak lr 2e-3; a dense model at 4e-3 stays ahead); 16 did a little worse than 8 in
a one-seed probe. Not tuned further."""


def lors_parameter_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.0, b_lr_ratio: float = DEFAULT_B_LR_RATIO
) -> list[dict[str, Any]]:
    """Parameter groups for a torch optimizer: ``lors_B`` at ``b_lr_ratio * lr``, the rest at ``lr``.

    Matrices (``ndim >= 2``: shared weights, ``lors_A``, ``lors_B``, dense weights, embeddings) get
    `weight_decay`; biases and norms get none. Every trainable parameter appears in exactly one group;
    a shared weight appears once. Empty groups are left out.

    Raises:
        ValueError: `model` has no LORS layer with a private rank (call `lorsify` first, or use plain
            parameter groups), or `lr` / `b_lr_ratio` is not positive.

    Example:
        >>> groups = lors_parameter_groups(model, lr=1e-3, weight_decay=0.01)  # doctest: +SKIP
        >>> [g["lr"] for g in groups]  # doctest: +SKIP
        [0.001, 0.001, 0.008]
    """
    if not lr > 0 or not b_lr_ratio > 0:
        raise ValueError(f"lors_parameter_groups: lr and b_lr_ratio must be positive (got lr={lr}, "
                         f"b_lr_ratio={b_lr_ratio}).")
    decay, no_decay, private_b = [], [], []
    for name, param in model.named_parameters():  # named_parameters yields a shared weight once
        if not param.requires_grad:
            continue
        if name.rsplit(".", 1)[-1] == "lors_B":
            if param.numel():
                private_b.append(param)
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
        {"params": private_b, "lr": lr * b_lr_ratio, "weight_decay": weight_decay},
    ]
    return [group for group in groups if group["params"]]
