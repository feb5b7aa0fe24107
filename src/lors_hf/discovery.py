"""Find the stacks of a model and the projections their layers share, and plan the private ranks.

One generic rule for every model family: a *stack* is an ``nn.ModuleList`` of two or more distinct
blocks of the same class (BERT's ``encoder.layer``, GPT-2's ``transformer.h``, DETR's encoder and
decoder, T5's and Whisper's encoder and decoder...). Each stack is its own sharing group. Inside
it, the projections (``nn.Linear`` or transformers' ``Conv1D``) that sit at the same relative path
with the same shape in two or more blocks form one *projection group* and share one weight (a
projection only some blocks have, like the shared experts of MoE layers after dense ones, is grouped
over those). Whatever else differs between blocks (T5 block 0's ``relative_attention_bias``) is left
alone, and so are projections whose weight is tied to another module's (Deformable DETR's box heads,
tied across the layers or, with box refinement, to the decoder's copies) and the few that their model
rewrites in place (RWKV's rescaled output projections; `_REWRITTEN_IN_PLACE`).
A list of lists (stages of blocks), or an outer list none of whose projections can be shared (Swin's
stages of different widths), gives way to the lists inside it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import LorsConfig, RankSpec
from .layer import LorsLinear

_PLAIN_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PLAIN_LINEAR_SUBCLASSES = frozenset({
    "transformers.models.falcon.modeling_falcon.FalconLinear",  # its forward is x @ W.T + b, written out
})
"""`nn.Linear` subclasses whose own ``forward`` is the plain linear map, so LORS may replace them."""


def is_projection(module: nn.Module) -> bool:
    """True for the modules LORS can share: ``nn.Linear``, GPT-2's ``Conv1D`` and `LorsLinear`.

    A subclass that computes something else (its own ``forward``: MoE routers such as Phimoe's, quantized
    layers such as FP8 or bitsandbytes ones) or keeps a weight that is not a plain float tensor is left alone:
    LORS would replace it by a plain linear map of the wrong weight. Subclasses known to compute the plain
    map in their own ``forward`` (Falcon's ``FalconLinear``) are projections.
    """
    if isinstance(module, LorsLinear):
        return True
    base = Conv1D if isinstance(module, Conv1D) else nn.Linear if isinstance(module, nn.Linear) else None
    weight = getattr(module, "weight", None)
    cls = type(module)
    plain_forward = cls.forward is getattr(base, "forward", None) or f"{cls.__module__}.{cls.__qualname__}" in \
        _PLAIN_LINEAR_SUBCLASSES
    return (base is not None and plain_forward
            and type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype in _PLAIN_FLOATS)


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a projection, whatever its storage convention."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


@dataclass
class ProjectionGroup:
    """One projection at the same relative path in the layers of a stack, sharing one weight."""

    stack_name: str
    relative_name: str
    layer_indices: list[int]
    out_features: int
    in_features: int
    ranks: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        """E.g. ``"encoder.layer.attention.self.query"``: how `LorsConfig.rank` dict keys see it."""
        return f"{self.stack_name}.{self.relative_name}"

    def module_name(self, layer_index: int) -> str:
        return f"{self.stack_name}.{layer_index}.{self.relative_name}"

    @property
    def max_rank(self) -> int:
        return min(self.out_features, self.in_features)

    def lors_parameters(self, ranks: list[int] | None = None) -> int:
        """Weight parameters of the group under LORS (shared + private factors, biases excluded)."""
        ranks = self.ranks if ranks is None else ranks
        return self.out_features * self.in_features + sum(ranks) * (self.out_features + self.in_features)

    def dense_parameters(self) -> int:
        return len(self.layer_indices) * self.out_features * self.in_features

    def no_smaller_as_lors(self, ranks: list[int] | None = None) -> bool:
        """Whether the group's LORS form (at `ranks`, default its own) holds at least as many weights as dense."""
        return self.lors_parameters(ranks) >= self.dense_parameters()


@dataclass
class Stack:
    """An ``nn.ModuleList`` of same-class blocks and its projection groups."""

    name: str
    blocks: nn.ModuleList
    groups: list[ProjectionGroup] = field(default_factory=list)


def find_stacks(model: nn.Module) -> list[Stack]:
    """Every ``nn.ModuleList`` holding >= 2 distinct blocks of one class with projections, outer ones first
    (`find_groups` keeps an outer stack over the ones nested in it when it has something to share).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                              intermediate_size=64))
        >>> [stack.name for stack in find_stacks(model)]
        ['encoder.layer']
    """
    stacks: list[Stack] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        blocks = list(module)
        if len({id(block) for block in blocks}) != len(blocks):
            continue  # the same block repeated: already shared, nothing to do
        if len({type(block) for block in blocks}) != 1 or is_projection(blocks[0]):
            continue
        if isinstance(blocks[0], nn.ModuleList):
            continue  # a list of lists (stages of layers): the inner lists are the stacks
        if not any(is_projection(sub) for sub in blocks[0].modules()):
            continue
        stacks.append(Stack(name=name, blocks=module))
    return stacks


def submodule_or_none(module: nn.Module, name: str) -> nn.Module | None:
    """``module.get_submodule(name)``, or None when there is no such submodule.

    Example:
        >>> submodule_or_none(nn.Sequential(nn.Linear(2, 2)), "1") is None
        True
    """
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _matches(module_name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, module_name) is not None
    return any(_suffix_matches(module_name, target) for target in spec)


def _suffix_matches(module_name: str, target: str) -> bool:
    """Whether `target` names the end of `module_name` (whole path segments); a ``*`` segment stands for any one
    name, such as the layer index in ``encoder.layer.*.attention.self.query`` (the form error messages list)."""
    if "*" not in target:
        return module_name == target or module_name.endswith("." + target)
    pattern = r"\.".join("[^.]+" if part == "*" else re.escape(part) for part in target.split("."))
    return re.fullmatch(rf"(?:.*\.)?{pattern}", module_name) is not None


def sharing_stacks(model: nn.Module, config: LorsConfig | None = None,
                   candidates: list[str] | None = None) -> list[Stack]:
    """The stacks of `model` with the projection groups `config` targets (every projection by default).

    An outer stack with something to share wins over the stacks nested in it; `candidates`, when given,
    collects the names of every shareable projection seen (for error messages).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                              intermediate_size=64))
        >>> [len(stack.groups) for stack in sharing_stacks(model)]
        [6]
    """
    config = config if config is not None else LorsConfig()
    candidates = candidates if candidates is not None else []
    kept_dense = _tied_projections(model) | _projections_rewritten_in_place(model)
    stacks: list[Stack] = []
    for stack in find_stacks(model):
        if any(stack.name.startswith(outer.name + ".") for outer in stacks):
            continue  # inside a stack that shares already: the outer stack wins
        _add_groups(stack, config, candidates, kept_dense)
        if stack.groups:
            stacks.append(stack)
    return stacks


def find_groups(model: nn.Module, config: LorsConfig, check_names: bool = True) -> list[Stack]:
    """The stacks of `model` with the projection groups `config` targets (ranks not yet set); a ValueError
    that says why when there are none, or (`check_names`) when a target or exclusion matches nothing."""
    candidates: list[str] = []
    stacks = sharing_stacks(model, config, candidates)
    if not stacks and not candidates:  # no stack holds a projection at all
        left_alone = sorted({type(m).__name__ for m in model.modules()
                             if isinstance(m, nn.Linear | Conv1D) and not is_projection(m)})
        shared_already = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)
                          and len({id(block) for block in m}) == 1 and any(map(is_projection, m[0].modules()))]
        raise ValueError(
            f"lorsify: found no stack of layers in {type(model).__name__}: LORS needs an nn.ModuleList of two "
            "or more blocks of the same class (like BERT's encoder.layer or GPT-2's transformer.h) holding "
            "projections." + (f" Its linear layers of class {', '.join(left_alone)} do not count: an nn.Linear "
                              "subclass with its own forward, or with a weight that is not a plain float tensor "
                              "(quantized), is left alone, as it may compute something other than x @ W.T + b."
                              if left_alone else "")
            + (f" Its module lists {', '.join(shared_already)} each hold one block: with one layer there is "
               "nothing to share, and a model that runs one block at every depth (ALBERT) already shares all of "
               "its weights." if shared_already else "")
        )
    if not stacks:
        raise ValueError(
            f"lorsify: target_modules={config.target_modules!r} exclude_modules={config.exclude_modules!r} "
            f"leave no projection shared by two or more layers. Projections in the stacks look like: "
            f"{_examples(candidates)} (as list entries, a * segment stands for any one name, e.g. a layer index)."
        )
    if check_names:
        _check_every_name_matches(model, config, candidates)
    return stacks


def _examples(names: list[str]) -> str:
    """A few of `names` with the layer indices written ``*`` (``encoder.layer.*.attention.self.query``)."""
    return ", ".join(sorted({re.sub(r"\.\d+\.", ".*.", name) for name in names})[:8])


def _naming(unmatched: list[str], one: str, many: str) -> str:
    """``"entry 'x' matches"`` or ``"entries ['x', 'y'] match"``."""
    return f"{one} {unmatched[0]!r} matches" if len(unmatched) == 1 else f"{many} {unmatched} match"


def _check_every_name_matches(model: nn.Module, config: LorsConfig, candidates: list[str]) -> None:
    """A ValueError for a `target_modules` / `exclude_modules` entry that matches no projection (a typo, or
    another model family's name), which would otherwise convert the model otherwise than asked, silently.
    A target must name a projection in a stack; an exclusion may name any projection of the model."""
    everywhere = [name for name, module in model.named_modules() if is_projection(module)]
    for option, spec, names in (("target_modules", config.target_modules, candidates),
                                ("exclude_modules", config.exclude_modules, everywhere)):
        if spec is None:
            continue
        # each entry on its own: a string is one regex, a list entry one suffix
        entries = [spec] if isinstance(spec, str) else spec
        unmatched = [entry for entry in entries
                     if not any(_matches(name, entry if isinstance(spec, str) else [entry]) for name in names)]
        if not unmatched:
            continue
        hint = (f" A string is one regex matched in full against the module path; to match names as suffixes "
                f"give a list ({option}=[{spec!r}])." if isinstance(spec, str) else
                " List entries are matched as suffixes of the module path (\"query\", \"attention.self.query\"; "
                "a * segment stands for any one name, e.g. a layer index).")
        raise ValueError(
            f"lorsify: {option} {_naming(unmatched, 'entry', 'entries')} no projection"
            f"{' in the stacks' if option == 'target_modules' else ''} of {type(model).__name__}.{hint} "
            f"Projections in the stacks look like: {_examples(candidates)}."
        )


def _tied_projections(model: nn.Module) -> set[int]:
    """The ids of the dense projections whose weight is tied to another module's: held by two modules or more
    (Deformable DETR's box heads, tied across the layers or, with box refinement, to the decoder's copies),
    reached at two places in the model (one module reused), or named in transformers' ``all_tied_weights_keys``
    (which ties them after loading and needs them dense)."""
    dense = [m for m in model.modules() if is_projection(m) and not isinstance(m, LorsLinear)]
    holders = Counter(id(m.weight) for m in dense)
    tied = {id(m) for m in dense if holders[id(m.weight)] > 1}
    # one module at two places (an encoder's projection reused by hand in the decoder): each place would get
    # its own LORS layer, untying them
    places = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    tied.update(id(m) for m in dense if places[id(m)] > 1)
    tied_keys = getattr(model, "all_tied_weights_keys", None) or {}
    for name in (*tied_keys, *tied_keys.values()):
        module_name, _, leaf = name.rpartition(".")
        module = submodule_or_none(model, module_name) if leaf == "weight" else None
        if module is not None and is_projection(module):
            tied.add(id(module))
    return tied


# The one place for models that write into some projections' weights themselves, in place: a LORS layer
# builds its weight from shared parts, so such a write would be lost and the outputs silently wrong. Those
# projections stay dense. {model class name: (whether it writes, the block list, the projections it writes)}
_REWRITTEN_IN_PLACE = {
    # RWKV divides these by 2 ** (i // rescale_every) when it switches to eval mode (and multiplies back for
    # training), while halving its hidden states every `rescale_every` blocks
    "RwkvModel": (lambda model: model.config.rescale_every > 0, "blocks", ("attention.output", "feed_forward.value")),
}


def _projections_rewritten_in_place(model: nn.Module) -> set[int]:
    """The ids of the projections that their model rewrites in place (`_REWRITTEN_IN_PLACE`)."""
    rewritten = set()
    for module in model.modules():
        writes, blocks, names = _REWRITTEN_IN_PLACE.get(type(module).__name__, (None, None, ()))
        if writes is None or not writes(module):
            continue
        for block in getattr(module, blocks):
            rewritten.update(id(projection) for name in names
                             if (projection := submodule_or_none(block, name)) is not None)
    return rewritten


def _add_groups(stack: Stack, config: LorsConfig, candidates: list[str], kept_dense: set[int]) -> None:
    """Fill ``stack.groups``: each relative path holding a projection in two or more blocks (of the class and
    shape most of its blocks have, the first block's on a tie; none of them kept dense, that is tied to
    another module (`_tied_projections`) or rewritten in place by the model (`_projections_rewritten_in_place`);
    targeted by `config`)."""
    kinds: dict[str, Counter] = {}  # relative path -> how many blocks hold which (class, shape) there
    examples: dict[tuple, nn.Module] = {}
    for block in stack.blocks:
        for relative_name, module in block.named_modules():
            if relative_name and is_projection(module):
                kind = (relative_name, type(module), projection_shape(module))
                kinds.setdefault(relative_name, Counter())[kind] += 1
                examples.setdefault(kind, module)
    for relative_name, counts in kinds.items():
        kind = counts.most_common(1)[0][0]  # Counter keeps first-seen order among equal counts
        module, shape = examples[kind], kind[2]
        members, tied = [], False
        for index, block in enumerate(stack.blocks):
            other = submodule_or_none(block, relative_name)
            if type(other) is not type(module) or projection_shape(other) != shape:
                continue
            full_name = f"{stack.name}.{index}.{relative_name}"
            candidates.append(full_name)
            if config.target_modules is not None and not _matches(full_name, config.target_modules):
                continue
            if config.exclude_modules is not None and _matches(full_name, config.exclude_modules):
                continue
            members.append(index)
            tied = tied or id(other) in kept_dense
        if len(members) >= 2 and not tied:  # e.g. the weight is another module's too (another block's...)
            stack.groups.append(ProjectionGroup(stack.name, relative_name, members, *shape))


def stack_parameters(stack: Stack) -> int:
    """Parameters the stack's blocks hold as a dense model (LORS layers counted as dense)."""
    total = 0
    seen: set[int] = set()
    for block in stack.blocks:
        for module in block.modules():
            for param in module.parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                total += param.numel()
            if isinstance(module, LorsLinear):
                total += module.out_features * module.in_features - module.lors_A.numel() - module.lors_B.numel()
    return total


def plan_ranks(model: nn.Module, config: LorsConfig, check_names: bool = True) -> list[Stack]:
    """Discover the groups `config` targets and give every member layer its private rank.

    Groups the plan leaves dense (a rank dict's ``"dense"``; under `target_reduction`, those whose LORS form
    would be no smaller than their dense layers; under an integer rank past a group's largest rank, those
    that not even rank 1 would make smaller) are dropped from ``stack.groups``, and stacks left with
    no group from the result.

    Raises ValueError when a rank does not fit the shapes, a per-layer list has the wrong length,
    `target_reduction` cannot be reached even by full sharing, the rank dict leaves every group dense, or
    (`check_names`, for `lorsify`; not when a checkpoint's recorded plan is rebuilt) a `target_modules` /
    `exclude_modules` entry or a rank dict key matches nothing.
    """
    stacks = find_groups(model, config, check_names)
    groups = [group for stack in stacks for group in stack.groups]
    too_small = []  # (spec, group, stack length): the rank does not fit, and no rank >= 1 would pay
    if config.target_reduction is not None:
        rank = _solve_uniform_rank(stacks, groups, float(config.target_reduction))
        for group in groups:
            uniform = _uniform_ranks(group, rank)
            group.ranks = [] if group.no_smaller_as_lors(uniform) else uniform
    else:
        if check_names:
            _check_every_rank_key_matches(config.rank, groups)
        for stack in stacks:
            for group in stack.groups:
                spec = _rank_spec_for(group, config.rank)
                if _too_small_for_any_rank(group, spec, uniform=not isinstance(config.rank, dict)):
                    group.ranks = []
                    too_small.append((spec, group, len(stack.blocks)))
                else:
                    group.ranks = [] if spec == "dense" else _expand(spec, group, len(stack.blocks))
    for stack in stacks:
        stack.groups = [group for group in stack.groups if group.ranks]
    stacks = [stack for stack in stacks if stack.groups]
    if not stacks and too_small:
        _expand(*too_small[0])  # nothing fits: the rank is wrong for this model, say so
    if not stacks:
        raise ValueError(
            f"lorsify: the rank dict {config.rank!r} maps every projection group to 'dense', so nothing would be "
            f"shared; give some groups a rank (e.g. add {{'.*': 32}} as the last entry). Groups: "
            f"{', '.join(group.name for group in groups)}."
        )
    return stacks


def _too_small_for_any_rank(group: ProjectionGroup, spec: RankSpec, uniform: bool) -> bool:
    """Whether an integer rank is past `group`'s largest one and not even rank 1 would make the group smaller
    as LORS (a ``1 x d`` gate, Qwen2-MoE's ``shared_expert_gate``). Under one rank for every group it then
    stays dense, as under `target_reduction`, instead of failing every rank above 1; a group that a smaller
    rank would shrink (Llama's 16 x 32 ``k_proj`` at rank 20), or a rank dict's entry, still fails."""
    return (uniform and isinstance(spec, int) and not isinstance(spec, bool) and spec > group.max_rank
            and group.no_smaller_as_lors(_uniform_ranks(group, 1)))


def _uniform_ranks(group: ProjectionGroup, rank: int) -> list[int]:
    """`rank` for every layer of `group`; a rank past the group's largest one stays at that (exact) rank."""
    return [min(rank, group.max_rank)] * len(group.layer_indices)


def _check_every_rank_key_matches(rank: RankSpec | dict[str, RankSpec], groups: list[ProjectionGroup]) -> None:
    """A ValueError for a rank dict key that matches no projection group (``"attn"`` on BERT, whose groups
    say ``attention``): its rank would silently apply nowhere."""
    if not isinstance(rank, dict):
        return
    unmatched = [key for key in rank if not any(re.search(key, group.name) for group in groups)]
    if unmatched:
        raise ValueError(
            f"lorsify: rank dict {_naming(unmatched, 'key', 'keys')} no projection group; "
            f"a key is a regex searched in the group names, which are: {', '.join(group.name for group in groups)}."
        )


def _rank_spec_for(group: ProjectionGroup, rank: RankSpec | dict[str, RankSpec]) -> RankSpec:
    if not isinstance(rank, dict):
        return rank
    for pattern, spec in rank.items():
        if re.search(pattern, group.name):
            return spec
    raise ValueError(
        f"lorsify: no key of the rank dict {list(rank)} matches projection group {group.name!r}; "
        "add a default entry such as {'.*': 8}."
    )


def _expand(spec: RankSpec, group: ProjectionGroup, stack_length: int) -> list[int]:
    if spec == "full":
        return [group.max_rank] * len(group.layer_indices)
    if isinstance(spec, list | tuple):
        if len(spec) != stack_length:
            raise ValueError(
                f"lorsify: the per-layer rank list {list(spec)} has {len(spec)} entries but stack "
                f"{group.stack_name!r} has {stack_length} layers; give exactly one rank per layer."
            )
        ranks = [int(spec[i]) for i in group.layer_indices]
    else:
        ranks = [int(spec)] * len(group.layer_indices)
    too_big = max(ranks)
    if too_big > group.max_rank:
        raise ValueError(
            f"lorsify: rank {too_big} does not fit {group.name!r} ({group.out_features}x{group.in_features}); "
            f"the largest useful rank is {group.max_rank} (or rank='full'). To keep a larger rank elsewhere, leave "
            f"it dense (exclude_modules=[{group.relative_name.rpartition('.')[2]!r}]) or give it its own rank "
            "with a rank dict."
        )
    return ranks


def _solve_uniform_rank(stacks: list[Stack], groups: list[ProjectionGroup], target: float) -> int:
    dense_total = sum(stack_parameters(stack) for stack in stacks)
    dense_targeted = sum(group.dense_parameters() for group in groups)

    def reduction(rank: int) -> float:
        # a group that LORS would not make smaller stays dense (`plan_ranks`)
        lors = sum(min(group.lors_parameters(_uniform_ranks(group, rank)), group.dense_parameters()) for group in groups)
        return 1.0 - (dense_total - dense_targeted + lors) / dense_total

    if reduction(0) < target:
        raise ValueError(
            f"lorsify: target_reduction={target} cannot be reached: even rank 0 (full sharing) removes only "
            f"{reduction(0):.1%} of the stacks' parameters. Lower target_reduction or target more modules."
        )
    low, high = 0, max(group.max_rank for group in groups)
    while low < high:  # largest rank whose reduction still reaches the target
        mid = (low + high + 1) // 2
        if reduction(mid) >= target:
            low = mid
        else:
            high = mid - 1
    return low


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a dense projection (Conv1D stores ``(in, out)``)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight
