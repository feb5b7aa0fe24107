"""Data-aware conversion: fit each projection's *outputs* on real activations, not its weights.

For the i-th layer of a projection group with dense weight ``W_i`` and bias ``b_i``, the converted
layer ``W'_i = S + B_i A_i`` (bias ``b'_i``) should reproduce the dense outputs on real inputs:

    minimise  E || W_i x + b_i - W'_i x' - b'_i ||^2

where ``x`` is what the dense model feeds the layer and ``x'`` what the converted model feeds it.

- First round (statistics of the dense model): ``x' = x``; the objective is ``||(W_i - W'_i) L_i||^2``
  with ``L_i L_i^T`` the inputs' second moment, solved jointly for ``S`` and every ``B_i A_i``
  (`conversion.decompose`, alternating).
- Sequential rounds (``rounds > 1``): the converted model's own inputs ``x'`` drift from the dense
  ones, block after block. With ``S`` kept, the blocks are refitted one after the other, in order:
  the calibration batches' hidden states are pushed through the dense block and the converted block
  side by side, and the converted block's private parts are refitted to the dense outputs given the
  inputs it really sees: with ``C = E[x' x'^T]`` and ``D = E[x x'^T]`` the objective is
  ``||(T_i - W'_i) L_i||^2 + const`` for the target ``T_i = W_i D C^-1``. So every block corrects
  what the blocks before it (already refitted) got wrong. Within a block the projections are refitted
  stage by stage in execution order (q/k/v, which read the same input, then o_proj on the outputs of
  the refitted q/k/v, then the MLP's), so each is fitted to the inputs it will really see; the
  refitted model is then a fixed point: another round changes nothing. A block of S stages runs
  S + 1 times side by side with its dense twin, but each pass computes the moments of one stage only
  (MiniLM's data-aware conversion at 50%: 34.5 s with one refit per block, 51.1 s now).
- Bias correction: a layer with a bias absorbs the mean of its output error,
  ``b'_i = b_i + W_i E[x] - W'_i E[x']``, and is fitted on centred statistics.
- Projections kept dense (a ``"dense"`` rank, or left dense by ``target_reduction``) are refitted in the
  sequential round too, at full rank: their weight becomes the target ``T_i`` itself (a ridge towards
  ``W_i``), so they also correct the error of what runs before them. SmolLM2 at 50%, keys and values
  kept dense, damping 0.1: perplexity 107.9 with them left as they were, 104.2 refitted.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import LorsConfig
from .conversion import decompose, fit_private, positive_definite
from .discovery import ProjectionGroup, Stack, dense_weight
from .layer import LorsLinear

DEFAULT_DAMPING = 0.1
"""Added to the diagonal of the input second moments (and of the cross moments), as a fraction of
their mean diagonal. Measured with the current sequential round (refit in execution order, projections
kept dense refitted too), MiniLM 1-cos / SmolLM2-135M perplexity (16384 calibration tokens) right after
conversion, `scripts/bench_convert.py` (docs/RESULTS.md, 2026-11-29/30):

    fewer stack parameters    MiniLM 0.1 / 0.3          SmolLM2 0.1 / 0.3
    30%                       0.1083 / 0.1092           73.46 / 79.15
    50%                       0.1891 / 0.1928           104.2 / 119.7
    70%                       0.3106 / 0.3160           167.6 / 198.2

0.1 is better everywhere (MiniLM at 50% with 1.0: 0.2170). The default was 0.3 before 2026-11-30: tuned when
the sequential round refitted a whole block from inputs gathered once, which wanted more ridge (SmolLM2 at
50% then gave 452 at 0.1 and 287 at 0.3, on 4096 calibration tokens and an earlier evaluation). Fewer
calibration tokens per input dimension may want more."""
CENTRED_SCALE_FLOOR = 0.05
"""The ridge of a centred fit is sized from at least this fraction of the uncentred second moment's mean
diagonal (`calibrated_targets`)."""


def checked_damping(damping: Any, what: str = "calibration_damping") -> float:
    """`damping` as a float; a TypeError or ValueError naming `what` unless it is a finite number >= 0.

    Example:
        >>> checked_damping(0.1)
        0.1
    """
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        raise TypeError(f"{what} must be a number, got {damping!r}.")
    if not 0 <= damping < math.inf:
        raise ValueError(f"{what} must be finite and >= 0 (e.g. 0.1), got {damping}.")
    return float(damping)


DEFAULT_ROUNDS = 2
"""First fit on the dense model's activations, then one sequential round on the converted model's.
Further rounds reproduce the second (see the module docstring). Before the refit went in execution
order, a third round moved the fits and overfitted the few calibration batches (SmolLM2 at 50%:
perplexity 452 -> 4998)."""


@dataclass
class InputStatistics:
    """Moments of the inputs of one projection group's N layers (float32).

    Attributes:
        second_moment: (N, in, in) ``E[x' x'^T]`` of the inputs the layers see.
        mean: (N, in) ``E[x']``.
        cross_moment: (N, in, in) ``E[x x'^T]`` with ``x`` the dense model's inputs of the same
            layer on the same tokens (sequential rounds); None on the dense model itself (``x = x'``).
        reference_mean: (N, in) ``E[x]``; None with `cross_moment`.
        tokens: how many tokens were seen.
    """

    second_moment: torch.Tensor
    mean: torch.Tensor
    cross_moment: torch.Tensor | None = None
    reference_mean: torch.Tensor | None = None
    tokens: int = 0


def collect_input_statistics(
    model: nn.Module,
    stacks: list[Stack],
    calibration_data: Iterable[Any] | torch.Tensor | Mapping,
) -> dict[str, InputStatistics]:
    """Run `calibration_data` through `model` and return the moments of every planned projection's inputs.

    Args:
        model: the model whose projections are observed (the dense model, before surgery).
        stacks: the plan from `discovery.plan_ranks`, for `model`.
        calibration_data: batches: dicts of model inputs (``{"input_ids": ..., "attention_mask": ...}``)
            or tensors of the model's main input (``model.main_input_name``: ``input_ids``, ``pixel_values``
            for a vision model); a single tensor or dict is one batch. ``labels`` are ignored, except by
            an encoder-decoder given no decoder inputs, which builds them from the labels.

    Returns:
        ``{group.name: InputStatistics}`` (no cross moments), layers in the order of ``group.layer_indices``.
        Padding positions (``attention_mask == 0``) are left out. Groups whose layers read the very same input
        tensors in every batch (q/k/v, gate/up) get the same ``second_moment`` and ``mean`` tensors: one copy,
        not one each (float32, every projection converted, worked out from the shapes: SmolLM2-135M 523 -> 403 MB,
        a 7B Llama 28 -> 22 GB); don't write to them in place.

    Example:
        >>> # statistics = collect_input_statistics(model, plan_ranks(model, config), [batch1, batch2])
    """
    if isinstance(calibration_data, torch.Tensor | Mapping):
        calibration_data = [calibration_data]
    device = next(model.parameters()).device
    sums: dict[tuple[str, int], _SharedSums] = {}  # the layers that read the same inputs share one
    counts: dict[tuple[str, int], int] = {}
    masks: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}  # per stack, for the batch running now
    encoder_states: dict[str, torch.Tensor | None] = {}  # per stack, what its block running now attends to
    last = _LastInput()
    readers: list[tuple[str, int]] = []  # the layers that read `last.tensor`, in a row

    def add_run() -> None:  # the moments of `last.tensor` to the sums of the layers that read it
        if readers:
            _add_run(sums, counts, readers, last.value)
            readers.clear()

    def block_hook(stack_name: str):
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            encoder_states[stack_name] = _encoder_states(block, args, kwargs)
        return hook

    def hook_for(key: tuple[str, int], stack_name: str):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            def moments() -> dict[str, Any]:
                x = _flatten(args[0].detach(), _mask_for(args[0], *masks[stack_name], encoder_states.get(stack_name)))
                return {"second": x.T @ x, "sum": x.sum(0), "count": x.shape[0]}

            if args[0] is not last.tensor:
                add_run()
            last.moments(args[0], moments)
            readers.append(key)
        return hook

    hooks = [model.get_submodule(group.module_name(index)).register_forward_pre_hook(
                 hook_for((group.name, index), stack.name))
             for stack in stacks for group in stack.groups for index in group.layer_indices]
    hooks += [block.register_forward_pre_hook(block_hook(stack.name), with_kwargs=True)
              for stack in stacks if _cross_attends(model, stack.name) for block in stack.blocks]
    was_training = model.training
    model.eval()
    batches = 0
    try:
        with torch.no_grad():
            for batch in calibration_data:
                inputs = _model_inputs(batch, device, model)
                masks.update({stack.name: (_padding_mask(model, stack.name, inputs), _cross_mask(model, stack.name, inputs))
                              for stack in stacks})
                try:
                    model(**inputs)
                    add_run()
                except (RuntimeError, IndexError, ValueError, TypeError, AttributeError, KeyError) as err:
                    raise ValueError(
                        f"calibration: {type(model).__name__} could not run calibration batch {batches}: {err} "
                        "(calibration_data must hold the model's own inputs: tensors of its main input "
                        f"{getattr(model, 'main_input_name', 'input_ids')!r} (integer input_ids of its vocabulary for a "
                        f"text model), or dicts of its keyword inputs{_decoder_inputs_hint(model, inputs)})"
                    ) from err
                batches += 1
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError("calibration_data is empty: give at least one batch of real inputs.")
    groups = [group for stack in stacks for group in stack.groups]
    finite: dict[int, bool] = {}
    for group in groups:
        keys = [(group.name, index) for index in group.layer_indices]
        missing = [k for k in keys if k not in sums]
        if missing:
            raise ValueError(
                f"calibration: projection {group.name!r} saw no input for layers {[k[1] for k in missing]}; "
                "does the calibration batch exercise the whole model (e.g. decoder inputs for encoder-decoders)?"
            )
        empty = [k[1] for k in keys if counts[k] == 0]
        if empty:
            raise ValueError(
                f"calibration: projection {group.name!r} saw 0 tokens in layers {empty}: every position of the "
                "calibration batches is padding (attention_mask all zeros) or was routed elsewhere; give batches "
                "with real tokens."
            )
        for key in keys:  # once per sum, not per group reading it (setdefault would evaluate the check every time)
            if id(sums[key]) not in finite:
                finite[id(sums[key])] = bool(torch.isfinite(sums[key].values["second"]).all())
        nonfinite = [k[1] for k in keys if not finite[id(sums[k])]]
        if nonfinite:
            raise ValueError(
                f"calibration: the inputs of projection {group.name!r} are not finite (NaN or inf) in layers "
                f"{nonfinite}: the calibration batches hold NaN/inf values, or the model overflows on them in its "
                "dtype (float16); give finite inputs the model runs on (or convert the model in float32/bfloat16)."
            )
    # Groups whose layers read the same inputs (q/k/v, gate/up) share one stacked tensor, too.
    rows = {group.name: [(sums[(group.name, index)], counts[(group.name, index)]) for index in group.layer_indices]
            for group in groups}
    signatures = {name: tuple((id(store), count) for store, count in layers) for name, layers in rows.items()}
    unread = Counter((id(store), name) for signature in set(signatures.values()) for store, _ in signature
                     for name in ("second", "sum"))  # rows still to read each sum
    stacked: dict[tuple, InputStatistics] = {}
    result: dict[str, InputStatistics] = {}
    for group in groups:
        signature = signatures[group.name]
        if signature not in stacked:
            layers = rows[group.name]
            stacked[signature] = InputStatistics(second_moment=_stacked_means(layers, "second", unread),
                                                 mean=_stacked_means(layers, "sum", unread), tokens=layers[0][1])
        shared = stacked[signature]
        result[group.name] = InputStatistics(second_moment=shared.second_moment, mean=shared.mean,
                                             tokens=shared.tokens)
    return result


def _stacked_means(layers: list[tuple[_SharedSums, int]], name: str, unread: Counter) -> torch.Tensor:
    """``store.values[name] / count`` stacked over `layers`, each sum let go once its last row is written
    (`unread`: how many rows of all the stacked tensors are still to read it) (the sums of all groups and their
    stacked means were held at once: twice the statistics at the end of the pass)."""
    first = layers[0][0].values[name]
    stacked = first.new_empty((len(layers), *first.shape))
    del first
    for row, (store, count) in zip(stacked, layers, strict=True):
        unread[id(store), name] -= 1
        torch.div(store.values[name] if unread[id(store), name] else store.values.pop(name), count, out=row)
    return stacked


def collect_input_covariances(
    model: nn.Module, stacks: list[Stack], calibration_data: Iterable[Any] | torch.Tensor
) -> dict[str, torch.Tensor]:
    """``{group.name: (layers, in, in)}``: the second moments ``X^T X / n`` of each projection's inputs.

    Example:
        >>> # covariances = collect_input_covariances(model, plan_ranks(model, config), [batch1, batch2])
    """
    statistics = collect_input_statistics(model, stacks, calibration_data)
    return {name: stats.second_moment for name, stats in statistics.items()}


def calibrated_targets(
    weights: torch.Tensor, statistics: InputStatistics, centred: bool, damping: float = DEFAULT_DAMPING,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, covariances)`` such that the output error equals ``||(T_i - W'_i) L_i||^2 + const``.

    Args:
        weights: (N, out, in) dense weights.
        statistics: from `collect_input_statistics`.
        centred: use centred moments (for layers whose bias absorbs the mean error, see `corrected_bias`).
        damping: added to the covariances' diagonal, as a fraction of their mean diagonal (centred: of at least
            `CENTRED_SCALE_FLOOR` times the uncentred one's).
        out: a float32 (N, in, in) tensor to write the damped covariances into, e.g. ``statistics.second_moment``
            itself when nothing reads it any more (layer i is read before it is written); default a new one.

    Returns:
        targets (N, out, in) and damped covariances (N, in, in), both float32.
    """
    weights = weights.detach().float()
    count, size = statistics.second_moment.shape[0], statistics.second_moment.shape[-1]
    # float64 one layer at a time: for all at once its copies came to several times the float32 moments
    covariances = out if out is not None else torch.empty(statistics.second_moment.shape, dtype=torch.float32,
                                                          device=statistics.second_moment.device)
    targets = weights if statistics.cross_moment is None else torch.empty_like(weights)
    eye = torch.eye(size, dtype=torch.float64, device=statistics.second_moment.device)
    for i in range(count):
        covariance = statistics.second_moment[i].double()
        scale = covariance.diagonal().mean()
        if centred:
            mean = statistics.mean[i].double()
            covariance = covariance - mean[:, None] * mean[None, :]
            # The centred covariance of one or two tokens is rounding noise (one image's 10 DETR queries nearly
            # so): a ridge sized from it let that noise through, and even rank "full" came out wrong (GPT-2 logits
            # 0.78 off on one token). On MiniLM's real calibration data the floor does not bind (the centred scale
            # is at least 0.47 of the uncentred one; the conversions came out bit-identical); other models with
            # biases and inputs of a large mean (GPT-2's) were not measured.
            scale = torch.maximum(covariance.diagonal().mean(), CENTRED_SCALE_FLOOR * scale)
        scale = scale.clamp_min(1e-12)
        covariance = positive_definite((covariance + damping * scale * eye)[None])[0]
        covariances[i] = covariance
        if statistics.cross_moment is None:
            continue
        cross = statistics.cross_moment[i].double()
        if centred:
            cross = cross - statistics.reference_mean[i].double()[:, None] * statistics.mean[i].double()[None, :]
        # The same damping on D as on C: with few tokens the target shrinks towards W (as if x = x'), not towards 0.
        cross = cross + damping * scale * eye
        # T = W D C^-1  <=>  C T^T = D^T W^T  (C symmetric)
        targets[i] = torch.linalg.solve(covariance, cross.mT @ weights[i].double().mT).mT
    return targets, covariances


def corrected_bias(
    bias: torch.Tensor, dense_weight: torch.Tensor, new_weight: torch.Tensor, statistics: InputStatistics, index: int
) -> torch.Tensor:
    """``b + W E[x] - W' E[x']``: the bias that removes the mean output error of layer `index`."""
    reference_mean = statistics.mean if statistics.reference_mean is None else statistics.reference_mean
    shift = dense_weight.float() @ reference_mean[index] - new_weight.float() @ statistics.mean[index]
    return (bias.float() + shift).to(bias.dtype)


def convert_with_calibration(
    model: nn.Module,
    stacks: list[Stack],
    config: LorsConfig,
    calibration_data: Iterable[Any] | torch.Tensor | Mapping,
    rounds: int = DEFAULT_ROUNDS,
    damping: float = DEFAULT_DAMPING,
    kept_dense: Iterable[ProjectionGroup] = (),
) -> None:
    """Build the LORS layers of `model` (in place) and fit them to the dense layers' outputs.

    Round 1 fits the shared and private parts on the dense model's activations; each further round
    refits the private parts (and biases) block by block on the converted model's own activations
    (a dense copy of the model is kept meanwhile; see the module docstring).

    Args:
        model: the dense model; `stacks` its plan (`discovery.plan_ranks`).
        config: ``init="alternating"`` refines round 1 with ``config.alternating_steps`` steps.
        calibration_data: batches (dicts of model inputs or ``input_ids`` tensors).
        rounds: 1 = dense activations only; 2 adds the sequential round (more reproduce it).
        damping: see `calibrated_targets`.
        kept_dense: targeted projection groups the plan keeps dense (``"dense"`` ranks). They stay
            ``nn.Linear`` / ``Conv1D``, but in the sequential rounds of the stacks in `stacks` their
            weights (and biases) are refitted at full rank, like the LORS layers, to reproduce the dense
            outputs on the inputs the converted model feeds them; round 1 leaves them as they are.
            On failure they get their weights back.

    Example:
        >>> # lorsify(model, LorsConfig(target_reduction=0.5, init="alternating"), calibration_data=batches)
    """
    from .surgery import build_lors_layers

    if rounds < 1:
        raise ValueError(f"calibration: rounds must be >= 1, got {rounds}.")
    batches = [calibration_data] if isinstance(calibration_data, torch.Tensor | Mapping) else list(calibration_data)
    kept_dense = list(kept_dense)
    reference = _dense_reference(model, kept_dense) if rounds > 1 else None
    statistics = collect_input_statistics(model, stacks, batches)
    # the planned projections' dense modules are swapped out, never written to: their tensors, not copies
    dense = {group.name: _dense_weights(model, group, copy=False) for stack in stacks for group in stack.groups}
    kept_by_stack: dict[str, list[ProjectionGroup]] = {}
    for group in kept_dense:
        kept_by_stack.setdefault(group.stack_name, []).append(group)
        dense[group.name] = _dense_weights(model, group, copy=True)
    build_lors_layers(model, stacks)
    steps = config.alternating_steps if config.init == "alternating" else 0
    with torch.no_grad():
        for stack in stacks:
            for group in stack.groups:
                # each group's moments (in^2 floats per layer) and temporaries are let go once it is fitted
                # (q/k/v, gate/up share them: the last one fitted may write over them)
                moments = statistics.pop(group.name)
                overwrite = all(other.second_moment is not moments.second_moment for other in statistics.values())
                _first_round_fit(stack, group, dense[group.name], moments, steps, damping, overwrite)
                del moments
    try:
        for _ in range(rounds - 1):
            for stack in stacks:
                refitted = Stack(stack.name, stack.blocks, stack.groups + kept_by_stack.get(stack.name, []))
                try:
                    _sequential_round(model, reference, refitted, dense, batches, damping)
                except RuntimeError as err:  # a block that cannot be replayed alone (e.g. a cache it extends)
                    reason = " ".join(str(err).split())
                    warnings.warn(f"calibration: the sequential refit of {stack.name} stopped ({reason}); its blocks "
                                  "not refitted keep the first-round fit", stacklevel=3)
    except BaseException:
        with torch.no_grad():  # the layers kept dense get their own weights back (LORS layers: see lorsify)
            for groups in kept_by_stack.values():
                for group in groups:
                    weights, biases = dense[group.name]
                    for position, index in enumerate(group.layer_indices):
                        _set_dense_layer(model.get_submodule(group.module_name(index)), weights[position],
                                         biases[position])
        raise
    finally:
        del reference


def _first_round_fit(stack: Stack, group: ProjectionGroup, dense: tuple[list[torch.Tensor], list[torch.Tensor | None]],
                     moments: InputStatistics, steps: int, damping: float, overwrite: bool = False) -> None:
    """Fit `group`'s shared weight and private parts to the dense model's activations (round 1).

    With `overwrite` (no other group shares `moments`' second moment) the damped covariances are written over
    it (only its mean is read afterwards, for the biases), and `decompose` (damping 0) takes them as they are:
    one float32 (N, in, in) tensor besides their Cholesky factors, where there were three (moments, damped,
    damped again)."""
    weights, biases = torch.stack(dense[0]), dense[1]
    layers = [stack.blocks[i].get_submodule(group.relative_name) for i in group.layer_indices]
    centred = all(layer.bias is not None for layer in layers)
    targets, covariances = calibrated_targets(weights, moments, centred, damping,
                                              out=moments.second_moment if overwrite else None)
    shared, factors = decompose(targets, group.ranks, steps=steps, input_covariances=covariances, damping=0.0)
    layers[0].shared.weight.copy_(shared)
    for position, (layer, (b, a)) in enumerate(zip(layers, factors, strict=True)):
        _set_layer(layer, b, a, biases[position], weights[position], moments, position, centred)


def _dense_reference(model: nn.Module, kept_dense: list[ProjectionGroup]) -> nn.Module:
    """The dense twin of `model` for the sequential rounds: its own modules, but the very tensors of `model`
    except the weights and biases of the projections kept dense, which those rounds refit in place (copied).
    Nothing else of `model` is written to: the planned projections are swapped for new LORS layers, their dense
    modules stay as they are. (A full ``deepcopy`` held every weight of the model twice: SmolLM2-135M in fp32,
    +513 MiB at the peak of a calibrated conversion.)"""
    refitted = {id(tensor) for group in kept_dense for index in group.layer_indices
                for tensor in model.get_submodule(group.module_name(index)).parameters(recurse=False)}
    memo: dict[int, Any] = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())
                            if id(tensor) not in refitted}
    return copy.deepcopy(model, memo)


def _dense_weights(model: nn.Module, group: ProjectionGroup, copy: bool
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """The dense weights ``(out, in)`` and biases of `group`'s layers as they are now: copies with `copy` (for
    layers refitted in place), else the tensors themselves (a stacked copy of every group's weights was kept
    before: SmolLM2-135M fp32, 400 MiB)."""
    layers = [model.get_submodule(group.module_name(i)) for i in group.layer_indices]

    def own(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().clone() if copy else tensor.detach()

    return ([own(dense_weight(layer)) for layer in layers],
            [None if layer.bias is None else own(layer.bias) for layer in layers])


def _set_layer(layer, b: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor,
               statistics: InputStatistics, position: int, centred: bool) -> None:
    layer.lors_B.copy_(b)
    layer.lors_A.copy_(a)
    if layer.bias is not None and bias is not None:
        new_weight = layer.shared.weight.float() + b @ a
        layer.bias.copy_(corrected_bias(bias, weight, new_weight, statistics, position) if centred else bias)


class _StopForward(Exception):
    """Raised by a hook once the blocks of interest have run: the rest of the model is not needed."""


def _capture_block_calls(model: nn.Module, blocks: nn.ModuleList, batches: list[Any]):
    """For every batch: the hidden state entering block 0 and each block's other (args, kwargs)."""
    device = next(model.parameters()).device
    calls: list[tuple[torch.Tensor, list[tuple[tuple, dict]]]] = []
    current: list[tuple[tuple, dict]] = []
    first: dict[str, torch.Tensor] = {}

    def pre_hook(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict):
            hidden, rest_args, rest_kwargs = _split_hidden(args, kwargs)
            if index == 0:
                first["hidden"] = hidden.detach()
            current.append((rest_args, rest_kwargs))
        return hook

    def stop(_module: nn.Module, _args: tuple, _output: Any) -> None:
        raise _StopForward

    handles = [block.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(stop))
    try:
        for batch in batches:
            current = []
            try:
                model(**_model_inputs(batch, device, model))
            except _StopForward:
                pass
            if len(current) != len(blocks):
                raise ValueError(f"calibration: the model ran {len(current)} of the stack's {len(blocks)} blocks.")
            calls.append((first.pop("hidden"), current))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _run_block(block: nn.Module, hidden: torch.Tensor, rest_args: tuple, rest_kwargs: dict) -> torch.Tensor:
    output = block(hidden, *rest_args, **rest_kwargs)
    return output[0] if isinstance(output, tuple | list) else output


def _sequential_round(model: nn.Module, reference: nn.Module, stack: Stack,
                      dense: dict[str, tuple[list[torch.Tensor], list[torch.Tensor | None]]],
                      batches: list[Any], damping: float) -> None:
    """Refit the private parts of `stack`'s blocks one after the other on the converted model's activations."""
    reference_blocks = reference.get_submodule(stack.name)
    was_training = model.training, reference.training
    model.eval()
    reference.eval()
    try:
        with torch.no_grad():
            lors_calls = _capture_block_calls(model, stack.blocks, batches)
            dense_calls = _capture_block_calls(reference, reference_blocks, batches)
            lors_hidden = [hidden for hidden, _ in lors_calls]
            dense_hidden = [hidden for hidden, _ in dense_calls]
            inputs = [_model_inputs(batch, lors_hidden[0].device, model) for batch in batches]
            masks = [(_padding_mask(model, stack.name, batch), _cross_mask(model, stack.name, batch)) for batch in inputs]
            for index, (block, dense_block) in enumerate(zip(stack.blocks, reference_blocks, strict=True)):
                # Refit stage by stage in execution order (q/k/v, then o_proj on the outputs of the refitted
                # q/k/v, ...): each projection is fitted to the inputs it will really see.
                pending = [g for g in stack.groups if index in g.layer_indices]
                while pending:
                    statistics, stages = _paired_block_statistics(
                        block, dense_block, pending, index, lors_hidden, dense_hidden,
                        [calls[index] for _, calls in lors_calls], [calls[index] for _, calls in dense_calls], masks)
                    _refit_layers(block, [g for g in pending if g.name in statistics], index, statistics, dense,
                                  damping)
                    # a routed expert no calibration token reached has no stage: it keeps its first-round fit
                    pending = [g for g in pending if g.name in stages and g.name not in statistics]
                for j in range(len(batches)):  # the refitted block's outputs feed the next block
                    lors_hidden[j] = _run_block(block, lors_hidden[j], *lors_calls[j][1][index])
                    dense_hidden[j] = _run_block(dense_block, dense_hidden[j], *dense_calls[j][1][index])
    finally:
        model.train(was_training[0])
        reference.train(was_training[1])


def _refit_layers(block: nn.Module, groups: list, index: int, statistics: dict[str, InputStatistics],
                  dense: dict[str, tuple[list[torch.Tensor], list[torch.Tensor | None]]], damping: float) -> None:
    """Refit block `index`'s layer in each of `groups`: a LORS layer's private part and bias (the shared weight
    is kept), a layer kept dense its whole weight and bias."""
    for group in groups:
        position = group.layer_indices.index(index)
        weights, biases = dense[group.name]
        layer = block.get_submodule(group.relative_name)
        centred = layer.bias is not None
        weight = weights[position].contiguous()  # a Conv1D's (out, in) view: the same rounding as a stacked copy
        targets, covariance = calibrated_targets(weight[None], statistics[group.name], centred, damping)
        if not isinstance(layer, LorsLinear):  # kept dense: the full-rank fit is the target itself
            bias = biases[position]
            if centred:
                bias = corrected_bias(bias, weight, targets[0], statistics[group.name], 0)
            _set_dense_layer(layer, targets[0], bias)
            continue
        (b, a), = fit_private(targets, layer.shared.weight, [group.ranks[position]], covariance)
        _set_layer(layer, b, a, biases[position], weight, statistics[group.name], 0, centred)


def _set_dense_layer(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Write an ``(out, in)`` `weight` (and `bias`) into an ``nn.Linear`` or a ``Conv1D`` (through `dense_weight`'s
    ``(out, in)`` view of its ``(in, out)`` storage)."""
    dense_weight(layer).copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)


def _paired_block_statistics(block, dense_block, groups, index, lors_hidden, dense_hidden, lors_calls, dense_calls,
                             masks) -> tuple[dict[str, InputStatistics], dict[str, int]]:
    """Each planned projection's stage (projections fed the same tensor, q/k/v, share one; numbered from 1 in
    execution order; a routed expert no token reached has none) and the input moments of the first stage's,
    converted inputs paired with dense inputs."""
    sums: dict[str, dict[str, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    dense_inputs: dict[str, torch.Tensor] = {}
    # the batch running now: its padding masks (own tokens, encoder's tokens) and each block's encoder states
    mask_holder: dict[str, Any] = {"masks": (None, None), "dense": None, "lors": None}

    def dense_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            dense_inputs[name] = _flatten(args[0].detach(), _mask_for(args[0], *mask_holder["masks"],
                                                                      mask_holder["dense"]))
        return hook

    last = _LastInput()
    stages: dict[str, int] = {}
    stage_counter = [0]

    def lors_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            reference = dense_inputs.pop(name, None)

            def moments() -> dict[str, torch.Tensor]:
                x = _flatten(args[0].detach(), _mask_for(args[0], *mask_holder["masks"], mask_holder["lors"]))
                # Routed experts: the dense model may have sent other tokens here (or none); without a token
                # for token pairing, the converted input stands for the dense one (the target stays W).
                paired = reference if reference is not None and reference.shape == x.shape else x
                return {"second": x.T @ x, "sum": x.sum(0), "cross": paired.T @ x,
                        "reference_sum": paired.sum(0), "count": x.shape[0]}

            if args[0] is not last.tensor:  # a new input tensor: the next stage
                stage_counter[0] += 1
            if stages.setdefault(name, stage_counter[0]) != 1:
                return  # a later stage: refitted on the next pass, after this one
            found = last.moments(args[0], moments)
            total = sums.setdefault(name, {})
            for key, value in found.items():
                if key != "count":
                    _accumulate(total, key, value)
            counts[name] = counts.get(name, 0) + found["count"]
        return hook

    handles = []
    for group in groups:
        handles.append(dense_block.get_submodule(group.relative_name).register_forward_pre_hook(dense_hook(group.name)))
        handles.append(block.get_submodule(group.relative_name).register_forward_pre_hook(lors_hook(group.name)))
    try:
        for j in range(len(lors_hidden)):
            mask_holder["masks"] = masks[j]
            mask_holder["dense"] = _encoder_states(dense_block, (None, *dense_calls[j][0]), dense_calls[j][1])
            mask_holder["lors"] = _encoder_states(block, (None, *lors_calls[j][0]), lors_calls[j][1])
            _run_block(dense_block, dense_hidden[j], *dense_calls[j])
            _run_block(block, lors_hidden[j], *lors_calls[j])
            dense_inputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    return {name: InputStatistics(
        second_moment=(total["second"] / counts[name])[None], mean=(total["sum"] / counts[name])[None],
        cross_moment=(total["cross"] / counts[name])[None], reference_mean=(total["reference_sum"] / counts[name])[None],
        tokens=counts[name]) for name, total in sums.items()}, stages


class _SharedSums:
    """Running sums of the input moments (``"second"``: ``sum x x^T``, ``"sum"``: ``sum x``) of the layers `keys`,
    which read the very same tensors in every batch so far (q, k and v of a block; gate and up): one ``(in, in)``
    sum for them all, not one each. The sums are replaced, never written to in place (stores split apart by
    `_add_run` hold the same tensors)."""

    def __init__(self, keys: list, values: dict[str, torch.Tensor] | None = None) -> None:
        self.keys = keys
        self.values = {} if values is None else values


def _add_run(sums: dict[Any, _SharedSums], counts: dict[Any, int], keys: list, found: dict[str, Any]) -> None:
    """Add the moments `found` of one input tensor to the sums of the `keys` that read it, in a row.

    Keys that first read a tensor together share one `_SharedSums` for as long as they go on reading one tensor
    together (in any order). When in some batch one of them is skipped, fed another tensor or run twice, or joins
    other keys, each of them gets a sum of its own: the shared one so far (its own too: they all got the same
    moments). So each key's sums are the very ones it would have on its own: the same additions, in the same order.
    """
    distinct = len(set(keys)) == len(keys)
    first = sums.get(keys[0])
    if distinct and not any(key in sums for key in keys):
        store = _SharedSums(list(keys))
        sums.update(dict.fromkeys(keys, store))
        stores = [store]
    elif distinct and first is not None and set(first.keys) == set(keys):
        stores = [first]
    else:
        for key in keys:
            shared = sums.get(key)
            if shared is not None and len(shared.keys) > 1:
                for other in shared.keys[1:]:
                    sums[other] = _SharedSums([other], dict(shared.values))
                shared.keys = shared.keys[:1]
        stores = [sums.setdefault(key, _SharedSums([key])) for key in keys]  # a key read twice adds twice
    for store in stores:
        _accumulate(store.values, "second", found["second"])
        _accumulate(store.values, "sum", found["sum"])
    for key in keys:
        counts[key] = counts.get(key, 0) + found["count"]


class _LastInput:
    """Memo of the moments of the last input seen: q, k and v (or gate and up) get the very same tensor.

    It keeps that tensor alive, so a later tensor can never reuse its memory and be mistaken for it.
    """

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None
        self.value: dict[str, Any] = {}

    def moments(self, tensor: torch.Tensor, compute) -> dict[str, Any]:
        if tensor is not self.tensor:
            self.tensor, self.value = tensor, compute()
        return self.value


def decoder_inputs_come_from_labels(model: nn.Module | None, inputs: Mapping[str, Any]) -> bool:
    """Whether `model` is an encoder-decoder that will build its decoder inputs from ``inputs["labels"]``
    (given no ``decoder_input_ids`` / ``decoder_inputs_embeds``): then the labels must reach it."""
    config = getattr(model, "config", None)
    return (bool(getattr(config, "is_encoder_decoder", False)) and inputs.get("labels") is not None
            and inputs.get("decoder_input_ids") is None and inputs.get("decoder_inputs_embeds") is None)


def _decoder_inputs_hint(model: nn.Module, inputs: Mapping[str, Any]) -> str:
    """For an encoder-decoder whose batch has no decoder inputs (nor labels to build them from), the fix."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return ""
    if "decoder_input_ids" not in inspect.signature(model.forward).parameters:
        return ""  # DETR: no decoder inputs to give
    if any(inputs.get(key) is not None for key in ("decoder_input_ids", "decoder_inputs_embeds", "labels")):
        return ""
    return ("; this batch has no decoder inputs: an encoder-decoder's batches need decoder_input_ids (or labels, "
            "from which it builds them), so that its decoder runs and is calibrated too")


_TOKEN_INPUTS = ("input_ids", "inputs_embeds")  # the main inputs an ``attention_mask`` is about


def _padding_mask(model: nn.Module, stack_name: str, inputs: Mapping[str, Any]) -> torch.Tensor | None:
    """The padding mask of a stack's tokens: ``attention_mask``, but for the decoder of an encoder-decoder its
    ``decoder_attention_mask`` (or none: the encoder's mask would drop real decoder tokens of the same length),
    and none for a stack in a sub-model of another input (CLIP's or LLaVA's vision tower, whose patches the
    text's mask would cut wherever the text is as long)."""
    tower = _innermost_submodel(model, stack_name)
    if tower is not None and getattr(tower, "main_input_name", "input_ids") not in _TOKEN_INPUTS:
        return None
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    if encoder_decoder and ".decoder." in f".{stack_name}.":
        labels = inputs.get("labels")  # decoder inputs built from the labels: their -100 positions are padding
        if inputs.get("decoder_attention_mask") is None and isinstance(labels, torch.Tensor) and labels.dim() == 2:
            return labels != -100
        return inputs.get("decoder_attention_mask")
    return inputs.get("attention_mask")


def _cross_attends(model: nn.Module, stack_name: str) -> bool:
    """Whether the stack at `stack_name` is the decoder of an encoder-decoder: its blocks attend to the encoder's
    states, whose tokens are the encoder's (its cross-attention keys and values read them)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False)) and ".decoder." in f".{stack_name}."


def _cross_mask(model: nn.Module, stack_name: str, inputs: Mapping[str, Any]) -> torch.Tensor | None:
    """The padding mask of the encoder states a decoder stack's cross-attention reads (the encoder's
    ``attention_mask``); None for any other stack."""
    return inputs.get("attention_mask") if _cross_attends(model, stack_name) else None


def _encoder_states(block: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The ``encoder_hidden_states`` a decoder block is called with (positional or keyword), or None."""
    try:
        bound = inspect.signature(block.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return None
    states = bound.get("encoder_hidden_states", bound.get("kwargs", {}).get("encoder_hidden_states"))
    return states if isinstance(states, torch.Tensor) else None


def _mask_for(x: torch.Tensor, own: torch.Tensor | None, cross: torch.Tensor | None,
              encoder_states: torch.Tensor | None) -> torch.Tensor | None:
    """The padding mask of a projection's input `x`: the encoder's (`cross`) when `x` is the encoder states a
    decoder block attends to (cross-attention keys and values), else the stack's own tokens' (`own`)."""
    return cross if encoder_states is not None and x is encoder_states else own


def _innermost_submodel(model: nn.Module, stack_name: str) -> nn.Module | None:
    """The deepest model below `model` (a module with its own ``config`` and ``main_input_name``, such as
    CLIP's ``vision_model``) that holds the stack at `stack_name`; None when the stack sits in `model` itself."""
    parts = stack_name.split(".")
    enclosing = [model.get_submodule(".".join(parts[:depth])) for depth in range(1, len(parts))]
    submodels = [module for module in enclosing if hasattr(module, "main_input_name") and hasattr(module, "config")]
    return submodels[-1] if submodels else None


def _flatten(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(tokens, features)`` float32 rows of `x`, without the padding positions of `mask`."""
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        x = x[mask.bool()]
    return x.reshape(-1, x.shape[-1]).float()


def _accumulate(store: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    store[name] = store[name] + value if name in store else value


def _model_inputs(batch: Any, device: torch.device, model: nn.Module | None = None) -> dict[str, Any]:
    """The batch as keyword inputs on `device`; ``use_cache=False`` when `model` takes it (blocks run twice)."""
    if isinstance(batch, torch.Tensor):  # the model's main input: input_ids, or pixel_values for ViT
        inputs = {getattr(model, "main_input_name", None) or "input_ids": batch.to(device)}
    elif isinstance(batch, Mapping):
        # labels only serve an encoder-decoder given no decoder inputs, which it builds from them
        keep_labels = decoder_inputs_come_from_labels(model, batch)
        main = getattr(model, "main_input_name", None) or "input_ids"
        for key, value in batch.items():
            if isinstance(value, list | tuple) and (key == main or key.endswith(("_ids", "_mask"))):
                raise TypeError(
                    f"calibration batch: {key!r} is a Python {type(value).__name__}, not a tensor; give tensors (a "
                    "tokenizer called with return_tensors='pt', a datasets.Dataset with .with_format('torch'), or a "
                    "DataLoader whose collator pads and stacks)."
                )
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                  if k != "labels" or keep_labels}
    else:
        raise TypeError(
            "calibration_data must yield dicts of model inputs or tensors of the model's main input (input_ids, "
            f"pixel_values...), got {type(batch).__name__}."
        )
    ids = inputs.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() == 1:  # one unbatched sequence (as a tokenizer gives it)
        inputs = {k: v[None] if isinstance(v, torch.Tensor) and v.dim() == 1 else v for k, v in inputs.items()}
    if model is not None and "use_cache" in inspect.signature(model.forward).parameters:
        inputs.setdefault("use_cache", False)
    return inputs
