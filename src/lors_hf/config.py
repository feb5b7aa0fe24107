"""`LorsConfig`: what to share, at which private rank, and how to initialise it."""

from __future__ import annotations

import dataclasses
import json
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

RankSpec = int | str | list[int]
"""A rank for one projection group: an int, ``"full"`` (exact), one int per layer of the stack, or (as a
value of a rank dict) ``"dense"``, which leaves the group's projections dense and unshared."""

INIT_METHODS = ("scratch", "svd", "alternating")

# Bumped when the saved layout changes; a checkpoint with a newer format is refused, not guessed at.
FORMAT_VERSION = 1


@dataclass
class LorsConfig:
    """How `lorsify` turns the stacked layers of a model into LORS layers.

    Every targeted projection of the i-th layer in a stack becomes ``W_i = W_shared + B_i @ A_i``
    with ``W_shared`` shared by the whole stack and ``B_i @ A_i`` private of rank ``r_i``.

    Args:
        rank: private rank of every layer. An int; ``"full"`` (``min(d_out, d_in)``: exact
            conversion); a list with one rank per layer of the stack (the paper's schedules, e.g.
            more private rank in late attention layers); or a dict mapping a regex (searched in the
            projection group's name, e.g. ``"encoder.layer.attention.self.query"``) to one of those
            or to ``"dense"`` (leave that group dense), first match wins; a key that matches no group
            is a ValueError at `lorsify`. Defaults to 32 unless
            ``target_reduction`` is given.
        target_reduction: instead of a rank, the fraction of the stacks' parameters to remove
            (e.g. 0.6); the largest uniform rank that reaches it is chosen. A group whose shared weight
            plus private factors at that rank would hold at least as many weights as its dense layers
            (grouped-query keys and values at a large rank) stays dense and no larger (exact, unless
            ``calibration_data`` refits it).
        target_modules: which projections to convert: a list of names matched as suffixes of the
            module path (``["query", "value"]``, ``["mlp.fc1"]``; a ``*`` segment stands for any one name,
            ``["layer.*.attention.self.query"]``), or one regex matched in full
            against the module path (``r".*decoder.*(q|v)_proj"``). Default: every linear
            projection (``nn.Linear`` or GPT-2's ``Conv1D``) inside each stacked block.
        exclude_modules: same forms as ``target_modules``; matching projections stay dense. An entry of
            either that matches no projection (a target: none in a stack) is a ValueError at `lorsify`.
        init: ``"scratch"`` (the paper's: the shared weight keeps the first layer's dense
            initialisation, ``A`` Kaiming-uniform, ``B`` zeros), ``"svd"`` (from pretrained
            weights: shared = mean of the layers, ``B_i A_i`` = truncated SVD of the residual) or
            ``"alternating"`` (``"svd"``, then alternating refinement of shared and private parts,
            `alternating_steps` rounds, minimising the weight reconstruction error). The default,
            ``"auto"``, is ``"svd"`` for a model whose weights were loaded (``from_pretrained``, the
            model's ``load_state_dict``, or `merge_and_unload` of a LORS model) or that is converted with
            calibration data, and ``"scratch"`` for a model built from a config (``from_config`` included);
            `lorsify` records the one it used.
        alternating_steps: rounds of refinement for ``init="alternating"`` and for data-aware
            conversion with calibration data.

    Example:
        >>> LorsConfig(rank=16).rank
        16
        >>> LorsConfig(rank={"attention": [8] * 6, ".*": 4}, init="svd").to_dict()["init"]
        'svd'
    """

    rank: RankSpec | dict[str, RankSpec] | None = None
    target_reduction: float | None = None
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init: str = "auto"
    alternating_steps: int = 8
    format_version: int = field(default=FORMAT_VERSION)

    def __post_init__(self) -> None:
        if self.rank is not None and self.target_reduction is not None:
            raise ValueError(
                "LorsConfig: give either `rank` or `target_reduction`, not both "
                f"(got rank={self.rank!r}, target_reduction={self.target_reduction!r})."
            )
        if self.rank is None and self.target_reduction is None:
            self.rank = 32
        # Python ints and lists (numpy integers, tuples), so that the JSON round trip is exact
        if isinstance(self.rank, dict):
            self.rank = {k: _plain(v) for k, v in self.rank.items()}
        else:
            self.rank = _plain(self.rank)
        if isinstance(self.target_reduction, numbers.Real) and not isinstance(self.target_reduction, bool | int):
            self.target_reduction = float(self.target_reduction)  # e.g. a numpy float
        self.alternating_steps = _plain(self.alternating_steps)
        if self.rank is not None:
            if isinstance(self.rank, dict):
                if not self.rank:
                    raise ValueError("LorsConfig: `rank` is an empty dict; map at least one pattern to a rank.")
                for pattern, spec in self.rank.items():
                    if not isinstance(pattern, str):
                        raise TypeError(f"LorsConfig: `rank` dict keys must be regex strings, got {pattern!r}.")
                    _compile(pattern, "rank")
                    _check_rank_spec(spec, f"rank[{pattern!r}]", dense_allowed=True)
            else:
                _check_rank_spec(self.rank, "rank")
        if self.target_reduction is not None:
            if isinstance(self.target_reduction, bool) or not isinstance(self.target_reduction, int | float):
                raise TypeError(f"LorsConfig: `target_reduction` must be a float in (0, 1), got {self.target_reduction!r}.")
            if not 0.0 < float(self.target_reduction) < 1.0:
                raise ValueError(
                    f"LorsConfig: `target_reduction` must lie in (0, 1) (e.g. 0.6 removes 60% of the stacks' "
                    f"parameters), got {self.target_reduction}."
                )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                _compile(value, name)
            elif isinstance(value, list | tuple | set) and all(isinstance(v, str) for v in value):
                setattr(self, name, list(value))
            else:
                raise TypeError(f"LorsConfig: `{name}` must be a list of names or one regex string, got {value!r}.")
        if self.init not in ("auto", *INIT_METHODS):
            raise ValueError(f"LorsConfig: unknown init {self.init!r}; choose one of auto, {', '.join(INIT_METHODS)}.")
        if isinstance(self.alternating_steps, bool) or not isinstance(self.alternating_steps, int) or self.alternating_steps < 1:
            raise ValueError(f"LorsConfig: `alternating_steps` must be a positive int, got {self.alternating_steps!r}.")
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int):
            raise TypeError(f"LorsConfig: `format_version` must be an int (LORS formats are numbered from 1; "
                            f"leave it at its default, {FORMAT_VERSION}), got {self.format_version!r}.")
        if self.format_version < 1:
            raise ValueError(f"LorsConfig: `format_version` must be >= 1 (LORS formats are numbered from 1; leave "
                             f"it at its default, {FORMAT_VERSION}), got {self.format_version}.")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"LorsConfig: this checkpoint uses LORS format {self.format_version}, newer than the format "
                f"{FORMAT_VERSION} this lors_hf understands; upgrade lors_hf (pip install -U lors-hf)."
            )

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what goes into ``config.json`` as ``lors_config``)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], user_given: bool = False) -> LorsConfig:
        """Rebuild a config from `to_dict` output; unknown fields (from a newer lors_hf) are an error.

        `user_given`: the dict is a user's own (``lorsify(model, {...})``), so an unknown field is a typo, and
        the error says so instead of blaming a newer lors_hf.

        Example:
            >>> LorsConfig.from_dict(LorsConfig(rank=4).to_dict()) == LorsConfig(rank=4)
            True
        """
        if isinstance(data, LorsConfig):
            return data
        if not isinstance(data, dict):
            raise TypeError(f"lors_config must be a dict, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown and user_given:
            raise ValueError(f"lorsify: `config` has keys {unknown} that LorsConfig does not take; its fields "
                             f"are {sorted(known)}.")
        if unknown:
            raise ValueError(
                f"lors_config has fields {unknown} that this lors_hf does not know; the checkpoint was "
                "probably written by a newer lors_hf: upgrade it (pip install -U lors-hf)."
            )
        return cls(**data)

    # --- a resolved plan (``model.config.lors_config`` of a LORS model) ------------------------------
    def private_ranks(self) -> list[int]:
        """The distinct non-zero private ranks a resolved config gives its layers, smallest first (of an
        unresolved one: the ranks it names; ``"full"`` and a budget are only known once resolved).

        Example:
            >>> LorsConfig(rank={"^a$": [4, 4], "^b$": [0, 8], "^c$": "dense"}).private_ranks()
            [4, 8]
        """
        specs = self.rank.values() if isinstance(self.rank, dict) else [self.rank]
        per_layer = [spec if isinstance(spec, list) else [spec] for spec in specs if spec not in ("full", "dense")]
        return sorted({r for ranks in per_layer for r in ranks if r})

    def dense_groups(self) -> list[str]:
        """The projection groups a resolved config leaves dense (written ``"^name$": "dense"``).

        Example:
            >>> LorsConfig(rank={"^k_proj$": "dense", "^q_proj$": [4, 4]}).dense_groups()
            ['k_proj']
        """
        if not isinstance(self.rank, dict):
            return []
        return [re.sub(r"\\(.)", r"\1", name.removeprefix("^").removesuffix("$"))
                for name, spec in self.rank.items() if spec == "dense"]

    def replace(self, **changes: Any) -> LorsConfig:
        """A copy with some fields changed (validated again)."""
        if "rank" in changes and "target_reduction" not in changes:
            changes["target_reduction"] = None
        if "target_reduction" in changes and changes["target_reduction"] is not None and "rank" not in changes:
            changes["rank"] = None
        return dataclasses.replace(self, **changes)


def _compile(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"LorsConfig: `{what}` pattern {pattern!r} is not a valid regex: {err}.") from None


def _plain(value: Any) -> Any:
    """Integer-likes (numpy integers) as ints and tuples as lists, recursively; anything else as it is."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _check_rank_spec(spec: Any, what: str, dense_allowed: bool = False) -> None:
    if isinstance(spec, str):
        if spec == "dense" and not dense_allowed:
            raise ValueError(f"LorsConfig: `{what}`='dense' would leave every projection dense; to keep some groups "
                             "dense, map their names to 'dense' in a rank dict, e.g. {'k_proj|v_proj': 'dense', '.*': 32}.")
        if spec not in ("full", "dense"):
            choices = "an int, 'full', 'dense' or a list of ints" if dense_allowed else "an int, 'full' or a list of ints"
            raise ValueError(f"LorsConfig: `{what}` must be {choices}, got {spec!r}.")
        return
    values = spec if isinstance(spec, list | tuple) else [spec]
    if isinstance(spec, list | tuple) and not spec:
        raise ValueError(f"LorsConfig: `{what}` is an empty list; give one rank per layer.")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"LorsConfig: `{what}` must hold ints, got {value!r}.")
        if value < 0:
            raise ValueError(f"LorsConfig: `{what}` must be >= 0 (0 shares the whole weight), got {value}.")
