"""Model surgery: `lorsify` swaps the stacks' projections for LORS layers; `merge_and_unload` undoes it.

The flow: `LorsConfig` -> `discovery.plan_ranks` (stacks, groups, ranks) -> `build_lors_layers`
(one `SharedWeight` per group, one `LorsLinear` per layer, swapped in place) -> initialisation
(`conversion.decompose`) -> ``model.config.lors_config`` (the resolved plan, so that
``from_pretrained`` can rebuild exactly the same structure before it loads the weights).
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .config import LorsConfig
from .conversion import decompose
from .discovery import Stack, dense_weight, find_groups, plan_ranks
from .layer import LorsLinear, SharedWeight, autocast_off

SHARED_CONTAINER = "lors_shared"
"""Attribute, on the module holding a stack, of the ``nn.ModuleDict`` that owns the shared weights."""


WEIGHTS_LOADED = "_lors_weights_loaded"
"""Attribute the load hooks set on a model that received weights (``from_pretrained``, ``load_state_dict``):
``init="auto"`` converts those (``"svd"``) and starts any other model as the paper does (``"scratch"``)."""


def check_model(model: Any, what: str) -> None:
    """A TypeError naming `what` unless `model` is a torch module (a checkpoint path is a common slip)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{what} takes a model (a torch nn.Module), got {type(model).__name__} {model!r:.80}; load a checkpoint "
            "first, e.g. AutoModelForCausalLM.from_pretrained(path) (LORS checkpoints too, once lors_hf is imported)."
        )


def is_lorsified(model: nn.Module) -> bool:
    """True when `model` holds LORS layers.

    A ``lors_config`` alone does not count: ``from_config`` of a LORS checkpoint's config builds dense layers.
    """
    check_model(model, "is_lorsified")
    return any(isinstance(m, LorsLinear) for m in model.modules())


def get_lors_config(model: nn.Module | PretrainedConfig) -> LorsConfig | None:
    """The `LorsConfig` recorded on ``model.config`` (or on a model config itself); None for a dense model.

    A module without a transformers config (a wrapper such as ``DistributedDataParallel``) is read through the
    first transformers model inside it.

    For a checkpoint on disk, use `load_lors_config(path)`.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                              intermediate_size=64))
        >>> get_lors_config(model) is None, get_lors_config(lorsify(model, rank=4)).init
        (True, 'scratch')
    """
    if isinstance(model, PretrainedConfig):
        data = getattr(model, "lors_config", None)
    elif isinstance(model, nn.Module):
        config = getattr(model, "config", None)
        if not isinstance(config, PretrainedConfig):  # a wrapper (DDP, a user's module): its transformers model's
            config = next((module.config for module in model.modules()
                           if isinstance(getattr(module, "config", None), PretrainedConfig)), None)
        data = getattr(config, "lors_config", None)
    else:
        raise TypeError(
            f"get_lors_config takes a model or its config, not {type(model).__name__} ({model!r:.80}); for a "
            "checkpoint folder use lors_hf.load_lors_config(path)."
        )
    return None if data is None else LorsConfig.from_dict(data)


def lorsify(
    model: PreTrainedModel,
    config: LorsConfig | Mapping[str, Any] | None = None,
    *,
    calibration_data: Iterable[Any] | torch.Tensor | None = None,
    calibration_damping: float | None = None,
    **overrides: Any,
) -> PreTrainedModel:
    """Turn every stack of `model` into LORS layers, in place, and return the same model.

    Each targeted projection of the i-th layer of a stack becomes ``W_i = W_shared + B_i @ A_i``:
    one shared weight per projection and stack, a private low-rank part and bias per layer. The model
    keeps its class, so ``generate()``, gradient checkpointing, ``save_pretrained`` and the Trainer work
    as before; the plan is recorded on ``model.config.lors_config``. What was frozen stays frozen: a
    layer's ``lors_A``, ``lors_B`` and bias take the ``requires_grad`` of the weight and bias they replace,
    and a shared weight trains if any of the weights it replaces did.

    Args:
        model: a transformers ``PreTrainedModel`` with at least one stack of layers.
        config: a `LorsConfig` (or its dict); defaults to ``LorsConfig()``.
        calibration_data: optional batches (dicts of model inputs, or tensors of the model's main input:
            ``input_ids``, ``pixel_values`` for a vision model)
            for data-aware conversion: the shared and private parts then minimise the error of each
            projection's outputs on these real activations instead of the weights' error. Needs
            ``init="svd"`` or ``"alternating"``. Targeted projections the plan keeps dense are refitted
            too (their weights change, see `calibration`); ``exclude_modules`` leaves projections untouched.
        calibration_damping: for data-aware conversion, the ridge added to the inputs' second moments, as
            a fraction of their mean diagonal (default `calibration.DEFAULT_DAMPING`); fewer calibration
            tokens per input dimension want more, see that constant for measured values.
        **overrides: fields of `LorsConfig` to change, e.g. ``rank=16``.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        ...                              intermediate_size=64))
        >>> model = lorsify(model, LorsConfig(rank=4))
        >>> type(model.encoder.layer[0].attention.self.query).__name__
        'LorsLinear'
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"lorsify expects a transformers PreTrainedModel, got {type(model).__name__}.")
    if is_lorsified(model):
        raise ValueError(
            "lorsify: this model is already a LORS model. Call lors_hf.merge_and_unload(model) first "
            "to get the dense model back, then lorsify it with the new config."
        )
    if config is None:
        config = LorsConfig(**overrides)
    else:
        if isinstance(config, Mapping):
            config = LorsConfig.from_dict(dict(config), user_given=True)
        elif not isinstance(config, LorsConfig):
            raise TypeError(f"lorsify: `config` must be a LorsConfig or a dict, got {type(config).__name__}.")
        if overrides:
            config = config.replace(**overrides)
    if config.init == "auto":  # loaded weights are converted; a model built from a config starts as the paper's
        pretrained = getattr(model, WEIGHTS_LOADED, False) or calibration_data is not None
        config = config.replace(init="svd" if pretrained else "scratch")
    if calibration_data is not None and any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "lorsify: calibration_data runs the model, but its weights are on the meta device (not loaded, e.g. "
            "built under init_empty_weights or torch.device('meta')): load the real weights first, or convert "
            "without calibration_data."
        )
    if calibration_data is not None and config.init == "scratch":
        raise ValueError(
            "lorsify: calibration_data converts pretrained weights; use init='svd' or init='alternating' "
            "(init='scratch' starts every layer equal to the shared weight and ignores data)."
        )
    if calibration_damping is not None:
        if calibration_data is None:
            raise ValueError("lorsify: calibration_damping applies to data-aware conversion; pass calibration_data "
                             "too, or leave calibration_damping out.")
        from .calibration import checked_damping

        calibration_damping = checked_damping(calibration_damping, "lorsify: calibration_damping")
    stacks = plan_ranks(model, config)
    _refuse_offloaded_weights(model, stacks, config)
    _warn_of_groups_larger_than_dense(stacks)
    planned = _group_names(stacks)
    kept_dense = [group for stack in find_groups(model, config, check_names=False)  # plan_ranks checked them
                  for group in stack.groups if group.name not in planned]
    dense_layers = {
        (stack.name, group.relative_name): [stack.blocks[i].get_submodule(group.relative_name) for i in group.layer_indices]
        for stack in stacks for group in stack.groups
    }
    try:
        with _without_autocast(model):  # an enclosing autocast would fit (and calibrate) in bf16
            if calibration_data is not None:
                from .calibration import DEFAULT_DAMPING, convert_with_calibration

                damping = DEFAULT_DAMPING if calibration_damping is None else calibration_damping
                convert_with_calibration(model, stacks, config, calibration_data, damping=damping, kept_dense=kept_dense)
            else:
                build_lors_layers(model, stacks)
                with torch.no_grad():
                    for stack in stacks:
                        for group in stack.groups:
                            dense = dense_layers[(stack.name, group.relative_name)]
                            lors = [stack.blocks[i].get_submodule(group.relative_name) for i in group.layer_indices]
                            _initialise(dense=dense, lors=lors, ranks=group.ranks, config=config)
    except BaseException:
        _restore_dense_layers(model, stacks, dense_layers)  # never leave a half-converted model behind
        raise
    _keep_frozen(stacks, dense_layers)
    _own_config(model)
    model.config.lors_config = resolved_config(config, stacks, tuple(sorted(group.name for group in kept_dense))).to_dict()
    return model


def _without_autocast(model: nn.Module) -> contextlib.ExitStack:
    """Autocast off, on the model's devices and the CPU, wherever an enclosing block turned it on: a conversion
    inside one fitted in bf16 (the factors, the input moments, the calibration passes) and the model was lossy
    even at full rank."""
    stack = contextlib.ExitStack()
    for device in {parameter.device.type for parameter in model.parameters()} | {"cpu"}:
        stack.enter_context(autocast_off(device))
    return stack


def _refuse_offloaded_weights(model: nn.Module, stacks: list[Stack], config: LorsConfig) -> None:
    """A ValueError when weights to convert were offloaded by a ``device_map`` (to disk, or to the CPU of a
    model on a GPU): accelerate keeps them out of the module, on the meta device, so converting would read
    nothing and the model would compute NaN or garbage. (Meta weights of a model built under
    ``init_empty_weights``, with no ``device_map``, are only given a structure, to load weights into later.)"""
    if config.init == "scratch" or not getattr(model, "hf_device_map", None):
        return
    offloaded = [f"{stack.name}.{index}.{group.relative_name}" for stack in stacks for group in stack.groups
                 for index in group.layer_indices
                 if dense_weight(stack.blocks[index].get_submodule(group.relative_name)).is_meta]
    if offloaded:
        raise ValueError(
            f"lorsify: {len(offloaded)} projection weights to convert (e.g. {offloaded[0]}) are offloaded by the "
            "model's device_map (on the meta device; accelerate keeps them on disk or elsewhere), so init "
            f"{config.init!r} has nothing to convert: load the model with its stacks in memory "
            "(device_map='cpu', or one device), lorsify it, then move it."
        )


def _warn_of_groups_larger_than_dense(stacks: list[Stack]) -> None:
    """Warn about groups whose (lossy) LORS form would hold at least as many weights as their dense layers: an
    explicit rank past the break-even (grouped-query keys and values); `target_reduction` never plans one."""
    larger = [group for stack in stacks for group in stack.groups
              if group.no_smaller_as_lors() and min(group.ranks) < group.max_rank]
    if larger:
        details = "; ".join(f"{group.name}: {group.lors_parameters():,} as LORS, {group.dense_parameters():,} dense"
                            for group in larger)
        warnings.warn(
            f"lorsify: these projection groups would hold more weights as LORS than dense, and lose accuracy: "
            f"{details}. Give them a lower rank, or keep them dense with a rank dict entry such as "
            f"{{'{larger[0].relative_name.split('.')[-1]}': 'dense', '.*': ...}}.", stacklevel=3)


def _group_names(stacks: list[Stack]) -> set[str]:
    return {group.name for stack in stacks for group in stack.groups}


def _restore_dense_layers(model: nn.Module, stacks: list[Stack], dense_layers: dict[tuple[str, str], list[nn.Module]]) -> None:
    """Undo a failed `lorsify`: the dense modules back in place, the shared-weight containers gone."""
    for stack in stacks:
        for group in stack.groups:
            for index, dense in zip(group.layer_indices, dense_layers[(stack.name, group.relative_name)], strict=True):
                _set_module(stack.blocks[index], group.relative_name, dense)
        shared_owner(model, stack)[0]._modules.pop(SHARED_CONTAINER, None)


def _keep_frozen(stacks: list[Stack], dense_layers: dict[tuple[str, str], list[nn.Module]]) -> None:
    """What the user froze stays frozen: each LORS layer's private factors and bias take the ``requires_grad`` of
    the dense weight and bias they replace, and a shared weight trains if any weight it replaces did."""
    for stack in stacks:
        for group in stack.groups:
            dense = dense_layers[(stack.name, group.relative_name)]
            lors = [stack.blocks[i].get_submodule(group.relative_name) for i in group.layer_indices]
            for dense_layer, layer in zip(dense, lors, strict=True):
                layer.lors_A.requires_grad_(dense_layer.weight.requires_grad)
                layer.lors_B.requires_grad_(dense_layer.weight.requires_grad)
                if layer.bias is not None:
                    layer.bias.requires_grad_(dense_layer.bias.requires_grad)
            lors[0].shared.weight.requires_grad_(any(d.weight.requires_grad for d in dense))


def _own_config(model: nn.Module) -> None:
    """Give `model` its own copy of its config (and its submodules the matching copies) before
    ``lors_config`` is written: models built from one config object share it, and a dense sibling must not
    become a "LORS" model."""
    memo: dict[int, Any] = {}
    config = copy.deepcopy(model.config, memo)
    for module in model.modules():
        current = module.__dict__.get("config")
        if current is not None and id(current) in memo:
            module.config = memo[id(current)]
    model.config = config


def resolved_config(config: LorsConfig, stacks: list[Stack], left_dense: tuple[str, ...] = ()) -> LorsConfig:
    """`config` with every group's per-layer ranks written out, so a reload needs no solving; the targeted
    groups the plan left dense (`left_dense`, their names) are written as ``"dense"``."""
    ranks: dict[str, list[int] | str] = {"^" + re.escape(name) + "$": "dense" for name in left_dense}
    for stack in stacks:
        for group in stack.groups:
            per_layer = [0] * len(stack.blocks)
            for index, rank in zip(group.layer_indices, group.ranks, strict=True):
                per_layer[index] = rank
            ranks["^" + re.escape(group.name) + "$"] = per_layer
    return config.replace(rank=ranks)


def build_lors_layers(model: nn.Module, stacks: list[Stack]) -> None:
    """Swap the planned projections for (uninitialised) LORS layers and register the shared weights.

    Used by `lorsify` (which then initialises them) and at load time (where the checkpoint fills them).
    """
    for stack in stacks:
        owner, path = shared_owner(model, stack)
        container = owner._modules.get(SHARED_CONTAINER)
        if container is None:
            container = nn.ModuleDict()
            owner.add_module(SHARED_CONTAINER, container)
        tree = nn.Module()
        _set_module(container, path, tree, create_parents=True)
        for group in stack.groups:
            first = stack.blocks[group.layer_indices[0]].get_submodule(group.relative_name)
            reference = dense_weight(first)
            shared = SharedWeight(group.out_features, group.in_features, device=reference.device, dtype=reference.dtype)
            _set_module(tree, group.relative_name, shared, create_parents=True)
            for index, rank in zip(group.layer_indices, group.ranks, strict=True):
                dense = stack.blocks[index].get_submodule(group.relative_name)
                layer = LorsLinear(shared, rank, bias=dense.bias is not None, fan_in_fan_out=isinstance(dense, Conv1D))
                _set_module(stack.blocks[index], group.relative_name, layer)


def shared_owner(model: nn.Module, stack: Stack) -> tuple[nn.Module, str]:
    """The module whose ``lors_shared`` holds `stack`'s shared weights, and the stack's path below it.

    That is the stack's parent (``bert.encoder`` for ``bert.encoder.layer``), or for a stack inside a
    container (Funnel's ``encoder.blocks.0``) the nearest ancestor that is not one: a ``ModuleList`` or
    ``ModuleDict`` would hand the shared weights to the code that iterates over it as one more layer.
    """
    parts = stack.name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:cut])) if cut else model
        if not isinstance(owner, nn.ModuleList | nn.ModuleDict | nn.Sequential):
            return owner, ".".join(parts[cut:])
    return model, stack.name


def _initialise(dense: list[nn.Module], lors: list[LorsLinear], ranks: list[int], config: LorsConfig) -> None:
    shared_module = lors[0].shared
    if config.init == "scratch":
        shared_module.weight.copy_(dense_weight(dense[0]))
        for dense_layer, layer in zip(dense, lors, strict=True):
            layer.reset_private()
            if layer.bias is not None:
                layer.bias.copy_(dense_layer.bias)
        return
    weights = torch.stack([dense_weight(layer) for layer in dense])
    steps = config.alternating_steps if config.init == "alternating" else 0
    shared, factors = decompose(weights, ranks, steps=steps)
    shared_module.weight.copy_(shared)
    for dense_layer, layer, (b, a) in zip(dense, lors, factors, strict=True):
        layer.lors_B.copy_(b)
        layer.lors_A.copy_(a)
        if layer.bias is not None:
            layer.bias.copy_(dense_layer.bias)


ModelT = TypeVar("ModelT", bound=nn.Module)


def merge_and_unload(model: ModelT) -> ModelT:
    """Write ``W_shared + B_i A_i`` back into stock ``nn.Linear`` / ``Conv1D`` modules, in place.

    Returns a plain transformers model (no LORS module, no ``lors_config``) with the same outputs,
    which stock transformers saves and loads without lors_hf. A wrapper around a LORS model (a user's module,
    ``DistributedDataParallel``) works too: the configs of the transformers models inside lose their
    ``lors_config``. The merged weights count as loaded ones: a later `lorsify` with ``init="auto"`` converts
    them (``"svd"``) rather than restarting every layer as its stack's first (``"scratch"``).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = lorsify(BertModel(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...                 num_attention_heads=2, intermediate_size=64)), rank=4)
        >>> model = merge_and_unload(model)
        >>> type(model.encoder.layer[0].attention.self.query).__name__
        'Linear'
    """
    check_model(model, "merge_and_unload")
    if not is_lorsified(model):
        raise ValueError("merge_and_unload: this model has no LORS layers (lorsify it first).")
    # the model and the transformers models inside it that hold LORS layers (``model.bert`` too, or the model
    # in a wrapper): their configs lose ``lors_config``, and their weights now hold what the LORS layers held
    holders = [module for module in model.modules()
               if (module is model or isinstance(module, PreTrainedModel))
               and any(isinstance(m, LorsLinear) for m in module.modules())]
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if not isinstance(module, LorsLinear):
                continue
            weight = module.effective_weight().detach()
            has_bias = module.bias is not None
            # built on meta, then given uninitialised memory where the weight is: every value is overwritten
            # below, and a random init (0.5 s per 4096 x 11008 layer on 2 cores) would be thrown away
            with torch.device("meta"):
                dense = (Conv1D(module.out_features, module.in_features) if module.fan_in_fan_out
                         else nn.Linear(module.in_features, module.out_features, bias=has_bias))
            dense = dense.to(dtype=weight.dtype).to_empty(device=weight.device)
            dense.weight.copy_(weight.t() if module.fan_in_fan_out else weight)
            if has_bias:
                dense.bias.copy_(module.bias)
                dense.bias.requires_grad_(module.bias.requires_grad)
            elif dense.bias is not None:
                dense.bias.zero_()
            # trainable if any part of the LORS layer was: one whose parts are all frozen stays frozen, but a
            # shared weight trains if any layer of its group did, so a frozen layer in such a group comes back
            # trainable
            dense.weight.requires_grad_(any(p.requires_grad for p in (module.shared.weight, module.lors_A, module.lors_B)))
            _set_module(model, name, dense)
    for module in list(model.modules()):
        if SHARED_CONTAINER in module._modules:
            del module._modules[SHARED_CONTAINER]
    for module in holders:
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig) and hasattr(config, "lors_config"):
            del config.lors_config
        setattr(module, WEIGHTS_LOADED, True)
    return model


def _set_module(root: nn.Module, path: str, module: nn.Module, create_parents: bool = False) -> None:
    parent = root
    *parents, leaf = path.split(".")
    for part in parents:
        child = parent._modules.get(part)
        if child is None:
            if not create_parents:
                raise AttributeError(f"{type(root).__name__} has no submodule {path!r}")
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    setattr(parent, leaf, module)
