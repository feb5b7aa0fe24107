"""Calibration for data-aware conversion: the second moment of each projection's real inputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .discovery import Stack


def collect_input_covariances(
    model: nn.Module, stacks: list[Stack], calibration_data: Iterable[Any] | torch.Tensor
) -> dict[str, torch.Tensor]:
    """Run `calibration_data` through the dense `model` and return ``X^T X / n`` per layer and group.

    Args:
        model: the dense model, before surgery.
        stacks: the plan from `discovery.plan_ranks`.
        calibration_data: batches: dicts of model inputs (``{"input_ids": ..., "attention_mask": ...}``)
            or tensors of ``input_ids``; a single tensor is taken as one batch.

    Returns:
        ``{group.name: tensor (layers, in, in)}`` in float32, in the order of ``group.layer_indices``.
        Padding positions (``attention_mask == 0``) are left out.

    Example:
        >>> # covariances = collect_input_covariances(model, plan_ranks(model, config), [batch1, batch2])
    """
    if isinstance(calibration_data, torch.Tensor | Mapping):
        calibration_data = [calibration_data]
    device = next(model.parameters()).device
    sums: dict[tuple[str, int], torch.Tensor] = {}
    counts: dict[tuple[str, int], int] = {}
    mask_holder: dict[str, torch.Tensor | None] = {"mask": None}
    hooks = []

    def make_hook(key: tuple[str, int]):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            mask = mask_holder["mask"]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1]).float()
            sums[key] = sums.get(key, 0) + x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]
        return hook

    for stack in stacks:
        for group in stack.groups:
            for index in group.layer_indices:
                module = stack.blocks[index].get_submodule(group.relative_name)
                hooks.append(module.register_forward_pre_hook(make_hook((group.name, index))))
    was_training = model.training
    model.eval()
    batches = 0
    try:
        with torch.no_grad():
            for batch in calibration_data:
                if isinstance(batch, torch.Tensor):
                    inputs = {"input_ids": batch.to(device)}
                elif isinstance(batch, Mapping):
                    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                              if k != "labels"}
                else:
                    raise TypeError(
                        "calibration_data must yield dicts of model inputs or tensors of input_ids, "
                        f"got {type(batch).__name__}."
                    )
                mask_holder["mask"] = inputs.get("attention_mask")
                model(**inputs)
                batches += 1
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError("calibration_data is empty: give at least one batch of real inputs.")
    result: dict[str, torch.Tensor] = {}
    for stack in stacks:
        for group in stack.groups:
            keys = [(group.name, index) for index in group.layer_indices]
            missing = [k for k in keys if k not in sums]
            if missing:
                raise ValueError(
                    f"calibration: projection {group.name!r} saw no input for layers {[k[1] for k in missing]}; "
                    "does the calibration batch exercise the whole model (e.g. decoder inputs for encoder-decoders)?"
                )
            result[group.name] = torch.stack([sums[k] / counts[k] for k in keys])
    return result
