"""Argument dataclasses and small helpers shared by the fine-tuning scripts in ``scripts/``.

The scripts follow the Hugging Face examples: an ``HfArgumentParser`` over a few dataclasses plus
``TrainingArguments``. The LORS part is the same everywhere::

    from transformers import TrainingArguments
    from lors_hf.training_args import LorsArguments, ScriptArgumentParser

    parser = ScriptArgumentParser((LorsArguments, TrainingArguments))
    lors_args, training_args = parser.parse_args_into_dataclasses()
    config = lors_args.to_config(pretrained=True)      # None with --no_lors (the dense baseline)

So is their ending: `defer_push_to_hub` before building the ``Trainer``, then `train_and_evaluate`
(``--do_train``, save, ``--do_eval``, ``--check_ddp_sync``) and `push_trained_model`.

User mistakes (a missing file, a bad column, a rank that does not fit) end the scripts with one line,
``error: ...`` on stderr and exit status 1 (2 for unparsable arguments), instead of a traceback:
raise `ScriptError` or wrap the setup in `user_errors`, and start the script with `run_main`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from transformers import HfArgumentParser
from transformers.utils import logging as hf_logging

from .calibration import checked_damping
from .config import INIT_METHODS, LorsConfig
from .optim import lors_parameter_groups
from .report import parameter_report
from .surgery import SHARED_CONTAINER

if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments

BUNDLED_MODELS = {"minilm": "minilm_path", "smollm2": "smollm2_path"}
"""``bundled:<name>`` model names and the `lors_hf.assets` function giving their directory."""

PARAMETER_REPORT_TEXT = "parameter_report.txt"
PARAMETER_REPORT_JSON = "parameter_report.json"
DDP_SYNC_DIR = "ddp_sync"

logger = logging.getLogger(__name__)


class ScriptError(Exception):
    """A mistake in the user's arguments or data: reported as one line, ``error: <message>``."""


# ----------------------------------------------------------------------------------- argument dataclasses


@dataclass
class LorsArguments:
    """The LORS options every script takes (``--lors_rank 32``, ``--lors_target_reduction 0.5``, ...).

    Example:
        >>> LorsArguments(lors_target_reduction=0.5).to_config(pretrained=True).init
        'svd'
        >>> LorsArguments(no_lors=True).to_config() is None
        True
    """

    lors_rank: str | None = field(
        default=None,
        metadata={
            "help": "Private rank (default 32 unless --lors_target_reduction is given): an int for every layer, "
            "'full' (exact conversion), a JSON list with one rank per layer ('[8,8,16,16]') or a JSON dict from "
            "group-name regex to rank, 'dense' keeping a group dense ('{\"attention\": 16, \"mlp\": 32}'), as "
            "LorsConfig's rank."
        },
    )
    lors_target_reduction: float | None = field(
        default=None,
        metadata={"help": "Instead of a rank: the fraction of the stacks' parameters to remove, e.g. 0.5."},
    )
    lors_init: str = field(
        default="auto",
        metadata={
            "help": "How to split the dense weights: 'svd' (shared = mean, private = truncated SVD), "
            "'alternating' (svd refined), 'scratch' (the paper's: B = 0). 'auto': 'svd' for pretrained "
            "weights, 'scratch' for a model built from a config.",
            "choices": ["auto", *INIT_METHODS],
        },
    )
    lors_calibration_batches: int = field(
        default=0,
        metadata={
            "help": "Data-aware conversion: run this many training batches through the dense model and "
            "minimise the error of each projection's outputs on them (needs svd/alternating init)."
        },
    )
    lors_calibration_damping: float | None = field(
        default=None,
        metadata={
            "help": "Data-aware conversion: the ridge added to the inputs' second moments, a fraction of their mean "
            "diagonal (default lors_hf.calibration.DEFAULT_DAMPING; needs --lors_calibration_batches)."
        },
    )
    lors_b_lr_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Learning rate of the private factors lors_B over --learning_rate (--optim over "
            "lors_hf.lors_parameter_groups). 1: one learning rate for all. Training from "
            "scratch, 8 did much better (scripts/bench_scratch.py --preset long); on a converted pretrained model it did "
            "worse (the MiniLM demo, README)."
        },
    )
    lors_stack_lr_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Learning rate of the shared weights and lors_A over --learning_rate (lors_B: this times "
            "--lors_b_lr_ratio; embeddings, norms, biases and heads keep --learning_rate). A shared weight moves "
            "every layer of its stack: from scratch at the dense model's best learning rate, 0.5 did better than 1 "
            "(scripts/bench_scratch.py --preset long --lr 4e-3); on a converted pretrained model it did worse (README)."
        },
    )
    no_lors: bool = field(default=False, metadata={"help": "Train the dense model instead (the baseline)."})
    check_ddp_sync: bool = field(
        default=False,
        metadata={
            "help": "After training, write a digest of the weights as each process holds them to "
            f"<output_dir>/{DDP_SYNC_DIR}/rank<k>.json (to check that DDP kept the shared weights equal)."
        },
    )

    def __post_init__(self) -> None:  # checked at parse time, not after minutes of loading the model
        typed = {"lors_rank": self.lors_rank}  # as the user wrote it, for the messages
        self.lors_rank = parse_rank_option(self.lors_rank)
        if self.no_lors:
            given = changed_options(self, ("lors_rank", "lors_target_reduction", "lors_init", "lors_calibration_batches",
                                           "lors_calibration_damping", "lors_b_lr_ratio", "lors_stack_lr_ratio"))
            if given:
                raise ValueError(f"--no_lors trains the dense model, so {' / '.join(given)} would be ignored: drop "
                                 f"{'it' if len(given) == 1 else 'them'} or --no_lors")
        if self.lors_calibration_batches is not None and self.lors_calibration_batches < 0:
            raise ValueError(f"--lors_calibration_batches must be >= 0 (0: no data-aware conversion), got "
                             f"{self.lors_calibration_batches}")
        if self.lors_calibration_damping is not None:
            if not self.lors_calibration_batches:
                raise ValueError("--lors_calibration_damping applies to data-aware conversion: add "
                                 "--lors_calibration_batches")
            checked_damping(self.lors_calibration_damping, "--lors_calibration_damping")
        for option, ratio in (("--lors_b_lr_ratio", self.lors_b_lr_ratio),
                              ("--lors_stack_lr_ratio", self.lors_stack_lr_ratio)):
            if not (math.isfinite(ratio) and ratio > 0):
                raise ValueError(f"{option} must be a finite number > 0, got {ratio:g}")
        try:  # LorsConfig's own checks (rank or target reduction, their ranges), which name its fields
            self.to_config()
        except (TypeError, ValueError) as err:
            given = " ".join(f"{option} {typed.get(option[2:], getattr(self, option[2:]))}"
                             for option in changed_options(self, ("lors_rank", "lors_target_reduction", "lors_init")))
            raise ValueError(f"{given}: {err}") from None

    def to_config(self, pretrained: bool = True) -> LorsConfig | None:
        """The `LorsConfig` these arguments ask for; None for the dense baseline (``--no_lors``).

        Args:
            pretrained: whether the model holds pretrained weights (picks the init for ``"auto"``).
        """
        if self.no_lors:
            return None
        init = self.lors_init if self.lors_init != "auto" else ("svd" if pretrained else "scratch")
        return LorsConfig(rank=self.lors_rank, target_reduction=self.lors_target_reduction, init=init)


def parse_rank_option(value: Any) -> Any:
    """``--lors_rank``'s text as a `LorsConfig` rank: an int, ``"full"``, or JSON (a per-layer list, a per-group
    dict); anything that is not text (a rank given in Python) is returned as it is, for `LorsConfig` to check.

    Example:
        >>> parse_rank_option("16"), parse_rank_option("full"), parse_rank_option('{"attention": 8, "mlp": 32}')
        (16, 'full', {'attention': 8, 'mlp': 32})
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if text == "full":
        return text
    example = 'e.g. \'{"attention": 16, "mlp": 32}\' or \'[8, 8, 16, 16]\''
    if text[:1] in ("[", "{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--lors_rank {value}: not valid JSON ({err.msg}, character {err.pos + 1}); {example} "
                             "(quote it in the shell; JSON keys take double quotes)") from None
    raise ValueError(f"--lors_rank {value!r}: give an int, 'full', a JSON list with one rank per layer or a JSON dict "
                     f"from group-name regex to rank, {example}")


@dataclass
class DistillArguments:
    """Recovery training by knowledge distillation from the dense model (``--distill``).

    Example:
        >>> DistillArguments(distill=True).distill_temperature
        2.0
    """

    distill: bool = field(
        default=False,
        metadata={"help": "Train the LORS model to match the dense model (KL on logits + hidden states)."},
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Dense teacher checkpoint (default: the dense model the LORS model was converted from)."},
    )
    distill_temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the KL term."})
    distill_alpha_kl: float = field(default=1.0, metadata={"help": "Weight of the KL term on the logits."})
    distill_alpha_hidden: float = field(default=1.0, metadata={"help": "Weight of the hidden-state term."})
    distill_alpha_task: float = field(default=1.0, metadata={"help": "Weight of the ordinary task loss."})

    def __post_init__(self) -> None:  # checked at parse time, not after minutes of loading and converting
        if not self.distill:
            given = changed_options(self, ("teacher_model_name_or_path", "distill_temperature", "distill_alpha_kl",
                                           "distill_alpha_hidden", "distill_alpha_task"))
            if given:
                raise ValueError(f"{' / '.join(given)} would be ignored without --distill: add --distill or drop "
                                 f"{'it' if len(given) == 1 else 'them'}")
        alphas = (self.distill_alpha_kl, self.distill_alpha_hidden, self.distill_alpha_task)
        if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            raise ValueError(f"--distill_temperature must be a finite number > 0, got {self.distill_temperature:g}")
        if not all(math.isfinite(a) and a >= 0 for a in alphas) or sum(alphas) == 0:
            raise ValueError("--distill_alpha_kl/_hidden/_task must be finite, >= 0 and not all 0, got "
                             + "/".join(f"{a:g}" for a in alphas))


# ------------------------------------------------------------------------------------------ parsing, errors


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(message).split())


class ScriptArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose errors are one line (``error: ...``, exit status 2), without the usage.

    Example:
        >>> from transformers import TrainingArguments
        >>> parser = ScriptArgumentParser((LorsArguments, TrainingArguments))
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {one_line(message)} (see --help)\n")

    def parse_args_into_dataclasses(self, args: list[str] | None = None, **kwargs: Any) -> tuple[Any, ...]:
        """As ``HfArgumentParser``'s, plus `implied_arguments` (``--use_cpu`` under torchrun without a GPU);
        an unknown argument is a one-line error too (``HfArgumentParser`` raises a ValueError with a traceback)."""
        args = list(sys.argv[1:] if args is None else args)
        if any(getattr(t, "__name__", "") == "TrainingArguments" for t in self.dataclass_types):
            args = implied_arguments(args)
        if kwargs.pop("return_remaining_strings", False):
            return super().parse_args_into_dataclasses(args=args, return_remaining_strings=True, **kwargs)
        try:  # a dataclass's own checks (__post_init__) raise ValueError: one line too
            *parsed, remaining = super().parse_args_into_dataclasses(args=args, return_remaining_strings=True,
                                                                     **kwargs)
        except ValueError as err:
            self.error(str(err))
        if remaining:
            self.error(f"unrecognized arguments: {' '.join(remaining)}")
        if any(getattr(dataclass, "do_predict", False) for dataclass in parsed):  # TrainingArguments
            self.error("--do_predict: these scripts write no predictions; use --do_eval (metrics on the validation set)")
        return tuple(parsed)


def parse_script_args(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse ``argv`` into ``dataclass_types`` and set up logging: INFO for the script, warnings for transformers.

    Example:
        >>> # lors_args, training_args = parse_script_args((LorsArguments, TrainingArguments), argv)
    """
    parsed = ScriptArgumentParser(dataclass_types).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    hf_logging.set_verbosity_warning()
    return parsed


def changed_options(arguments: Any, names: tuple[str, ...]) -> list[str]:
    """``--name`` for each of `names` whose value in the dataclass `arguments` differs from its field default.

    Example:
        >>> changed_options(LorsArguments(lors_rank=8), ("lors_rank", "lors_init"))
        ['--lors_rank']
    """
    defaults = {field_.name: field_.default for field_ in fields(arguments)}
    return [f"--{name}" for name in names if getattr(arguments, name) != defaults[name]]


def implied_arguments(args: list[str]) -> list[str]:
    """``args`` plus ``--use_cpu`` when launched by torchrun (``WORLD_SIZE`` > 1) on a machine without GPU.

    Without it transformers sets up no DDP on CPU and every process silently trains alone.

    Example:
        >>> implied_arguments(["--output_dir", "out"])  # WORLD_SIZE unset: unchanged
        ['--output_dir', 'out']
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    given = any(a.startswith(("--use_cpu", "--use-cpu")) for a in args)
    if distributed and not given and not torch.cuda.is_available():
        return [*args, "--use_cpu"]
    return list(args)


def check_fits_positions(model: torch.nn.Module, length: int, option: str) -> None:
    """A `ScriptError` when `length` tokens (``--block_size``, ``--max_seq_length``) exceed `model`'s positions.

    Example:
        >>> # check_fits_positions(model, data_args.block_size, "--block_size")
    """
    config = getattr(model, "config", None)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ScriptError(f"{option} {length} exceeds the model's {limit} positions")


def check_counts(**counts: int | None) -> None:
    """Refuse a count option below 1 (None: not given), at parse time (``__post_init__``).

    Example:
        >>> check_counts(max_train_samples=None, max_eval_samples=8)
    """
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn the errors a bad argument or file causes (ValueError, OSError, KeyError...) into `ScriptError`.

    Wrap the setup phase (loading data and models, converting) in it, not the training loop, whose
    failures are bugs and keep their traceback.

    Example:
        >>> with user_errors():  # doctest: +SKIP
        ...     dataset = load_dataset("csv", data_files=path)
    """
    kinds = kinds or (ValueError, OSError, KeyError, ImportError, *_file_error_kinds())
    if ValueError in kinds:  # a config field of the wrong type (--config_overrides n_layer=two) is a bad value too
        from huggingface_hub.errors import StrictDataclassError

        kinds = (*kinds, StrictDataclassError)
    try:
        yield
    except ScriptError:
        raise
    except kinds as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ScriptError(one_line(message) or type(err).__name__) from err


def _file_error_kinds() -> tuple[type[BaseException], ...]:
    """Errors of unreadable data and weight files: a malformed csv / json, a truncated safetensors file."""
    from datasets.exceptions import DatasetGenerationError
    from safetensors import SafetensorError

    return DatasetGenerationError, SafetensorError


def check_no_empty_cells(raw: Any, columns: list[str]) -> None:
    """Refuse data with an empty cell (csv / json) in `columns`, naming the split, row and column
    (the tokenizer would fail on it with a type error that names none of them).

    Example:
        >>> # check_no_empty_cells(raw_datasets, ["text"])
    """
    for split_name, split in raw.items():
        for column in columns:
            # Arrow's null count first (free), so the row is looked for only when there is one to find.
            if column in split.column_names and split.data.column(column).null_count:
                row = next((i for i, value in enumerate(split[column]) if value is None), None)
                if row is not None:
                    raise ScriptError(f"{split_name} data: row {row} has no value in column {column!r}; "
                                      "fill or drop it")


def resolve_resume(model: torch.nn.Module, resume_from_checkpoint: str | bool | None,
                   output_dir: str | os.PathLike) -> str | None:
    """``--resume_from_checkpoint`` as the checkpoint folder to give ``Trainer.train``, checked against `model`.

    ``True`` (any case) is the last ``checkpoint-<step>`` folder of `output_dir`, as the Trainer reads it;
    ``False`` or ``None`` is no resume. A folder that is not a checkpoint, or whose LORS plan is not `model`'s
    (another rank would otherwise fail deep in ``load_state_dict`` with a wall of size mismatches), or a
    ``True`` with no checkpoint to resume, is a one-line `ScriptError`.

    Example:
        >>> resolve_resume(None, "false", "out") is None
        True
    """
    value = str(resume_from_checkpoint) if isinstance(resume_from_checkpoint, bool) else resume_from_checkpoint
    if value is None or value.lower() == "false":
        return None
    if value.lower() == "true":
        from transformers.trainer_utils import get_last_checkpoint

        value = get_last_checkpoint(os.fspath(output_dir)) if os.path.isdir(output_dir) else None
        if value is None:
            raise ScriptError(f"--resume_from_checkpoint {resume_from_checkpoint}: no checkpoint-<step> folder in "
                              f"--output_dir {output_dir} to resume from")
    from .persistence import load_lors_config
    from .surgery import get_lors_config

    folder = Path(value)
    if not (folder / "config.json").is_file():
        raise ScriptError(f"--resume_from_checkpoint {value}: no checkpoint folder there "
                          "(a checkpoint-<step> folder of --output_dir)")
    with user_errors():
        saved = load_lors_config(folder)
    ours = get_lors_config(model)
    if (saved is None) != (ours is None) or (saved is not None and saved.rank != ours.rank):
        raise ScriptError(f"--resume_from_checkpoint {value} holds a {_describe(saved)} model but these arguments "
                          f"build a {_describe(ours)} one: resume with the LORS options it was trained with")
    return value


def _describe(config: LorsConfig | None) -> str:
    if config is None:
        return "dense"
    return f"LORS (private ranks {config.private_ranks() or [0]})"


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Call ``main(argv)``; a `ScriptError` becomes ``error: <message>`` on stderr and exit status 1.

    Under torchrun the process group (which the Trainer started) is destroyed before returning, however
    ``main`` ended: left to interpreter shutdown, gloo's worker threads can abort the process (SIGABRT,
    "terminate called without an active exception") after the work is done.

    Example:
        >>> # if __name__ == "__main__": sys.exit(run_main(main))
    """
    try:
        return main(argv) or 0
    except ScriptError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def resolve_model_path(name: str) -> str:
    """A model path or Hub id, with ``bundled:minilm`` / ``bundled:smollm2`` mapped to the offline assets.

    Example:
        >>> resolve_model_path("bert-base-uncased")
        'bert-base-uncased'
    """
    if not name.startswith("bundled:"):
        looks_local = name.startswith(("/", "./", "../", "~")) or os.path.exists(name)
        if looks_local and not Path(name).expanduser().is_dir():
            raise ScriptError(f"{name}: no such model directory")
        return str(Path(name).expanduser()) if looks_local else name
    key = name.removeprefix("bundled:")
    if key not in BUNDLED_MODELS:
        raise ScriptError(f"unknown bundled model {name!r}; choose one of "
                          + ", ".join(f"bundled:{k}" for k in BUNDLED_MODELS))
    from . import assets

    with user_errors():
        return getattr(assets, BUNDLED_MODELS[key])()


def checkpoint_labels(model_path: str, names: list[str]) -> dict[int, str] | None:
    """The checkpoint's ``id2label`` (every id) if its head was trained on each of ``names``, else None.

    A head kept from a checkpoint must keep its own label order: mapping the data's labels to its outputs
    by position would swap classes silently. Each name must appear exactly once among the checkpoint's labels
    (COCO-style heads repeat ``"N/A"`` for unused ids; those may repeat). None means the head is new to these
    labels (the script then numbers them itself); names that repeat in the data also give None.

    Example:
        >>> checkpoint_labels("out/sst2-lors", ["negative", "positive"])  # doctest: +SKIP
        {0: 'negative', 1: 'positive'}
    """
    from collections import Counter

    from transformers import AutoConfig

    with user_errors():
        id2label = {int(i): str(label) for i, label in (AutoConfig.from_pretrained(model_path).id2label or {}).items()}
    names = [str(name) for name in names]
    counts = Counter(id2label.values())
    if len(set(names)) != len(names) or any(counts[name] != 1 for name in names):
        return None
    return id2label


def check_file(path: str | None, option: str, suffixes: tuple[str, ...]) -> str | None:
    """Return ``path`` after checking that it exists and has one of ``suffixes`` (None passes)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise ScriptError(f"{option} {path}: no such file")
    if not path.endswith(suffixes):
        raise ScriptError(f"{option} {path}: expected a {' / '.join(suffixes)} file")
    return path


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``"n_layer=2,n_embd=64,activation=gelu"`` -> ``{"n_layer": 2, "n_embd": 64, "activation": "gelu"}``.

    Values are read as JSON when they parse (ints, floats, true/false, lists), else kept as strings;
    a comma starts a new item only when ``key=`` follows it, so lists need no quoting.

    Example:
        >>> parse_overrides("n_layer=2,dropout=0.1,act=gelu,hidden_sizes=[8,16]")
        {'n_layer': 2, 'dropout': 0.1, 'act': 'gelu', 'hidden_sizes': [8, 16]}
    """
    result: dict[str, Any] = {}
    if not text:
        return result
    for item in re.split(r",(?=\s*\w+\s*=)", text):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ScriptError(f"bad override {item!r}: expected key=value (e.g. n_layer=2,n_embd=64)")
        try:
            result[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            result[key.strip()] = value
    return result


def apply_overrides(config: Any, overrides: dict[str, Any], option: str = "--config_overrides") -> None:
    """Set ``overrides`` on a transformers config; an unknown key is a `ScriptError`."""
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ScriptError(f"{option}: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)


# ------------------------------------------------------------------------------------------------- LORS


def lors_optimizers(model: torch.nn.Module, training_args: TrainingArguments,
                    lors_args: LorsArguments) -> tuple[torch.optim.Optimizer | None, None]:
    """The ``Trainer``'s ``optimizers=`` argument: ``(None, None)`` (its own optimizer) unless
    ``--lors_b_lr_ratio`` or ``--lors_stack_lr_ratio`` differs from 1, then the optimizer of ``--optim`` (and
    ``--optim_args``, ``--adam_*``...) as the Trainer builds it, over `lors_parameter_groups` (shared weights and
    ``lors_A`` at the stack ratio times ``--learning_rate``, ``lors_B`` at both ratios times it;
    ``--weight_decay``). The Trainer's scheduler scales every group, so the ratio holds throughout. An
    ``--optim`` that makes its own parameter groups (GaLore, LOMO, layer-wise ones) is then a `ScriptError`.

    Example:
        >>> # trainer = Trainer(..., optimizers=lors_optimizers(model, training_args, lors_args))
    """
    from transformers import Trainer

    ratio, stack = lors_args.lors_b_lr_ratio, lors_args.lors_stack_lr_ratio
    if lors_args.no_lors or ratio == stack == 1:
        return None, None
    optim = getattr(training_args.optim, "value", training_args.optim)
    options = f"--lors_b_lr_ratio {ratio:g} --lors_stack_lr_ratio {stack:g}"
    try:
        optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    except (ImportError, ValueError) as error:  # a package it needs is missing, bad --optim_args
        raise ScriptError(f"--optim {optim}: {error}") from None
    if {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
        raise ScriptError(f"--optim {optim} makes its own parameter groups, so {options} cannot set theirs: "
                          "drop the ratios, or use another --optim (adamw_torch_fused, the default)")
    try:  # lors_parameter_groups names a model without private rank
        groups = lors_parameter_groups(model, training_args.learning_rate, training_args.weight_decay, ratio, stack)
    except ValueError as error:
        raise ScriptError(f"{options}: {error}") from None
    logger.info("optimizer: %s, shared weights and lors_A at %gx the learning rate, lors_B at %gx (%d tensors)",
                optimizer_class.__name__, stack, stack * ratio, len(groups[-1]["params"]))
    optimizer_kwargs.pop("lr", None)  # every group has its own
    return optimizer_class(groups, **optimizer_kwargs), None


def convert_model(model: torch.nn.Module, lors_args: LorsArguments, pretrained: bool,
                  calibration_batches: list[dict[str, torch.Tensor]] | None = None) -> torch.nn.Module:
    """``lorsify`` `model` as `lors_args` asks (a no-op for ``--no_lors``); bad settings are `ScriptError`.

    A model that is already LORS (a checkpoint saved by lors_hf) is kept as it is, to train or evaluate
    further; conversion options given with it are a `ScriptError`.

    Example:
        >>> # model = convert_model(model, lors_args, pretrained=True, calibration_batches=batches[:4])
    """
    from .surgery import is_lorsified, lorsify

    if is_lorsified(model):
        asked = [option for option, given in (
            ("--lors_rank", lors_args.lors_rank is not None),
            ("--lors_target_reduction", lors_args.lors_target_reduction is not None),
            ("--lors_init", lors_args.lors_init != "auto"), ("--lors_calibration_batches", bool(calibration_batches)),
            ("--no_lors", lors_args.no_lors)) if given]
        if asked:
            raise ScriptError(f"the model is already a LORS checkpoint, so {' / '.join(asked)} cannot apply: drop "
                              "them to train or evaluate it as it is, or start from the dense model "
                              "(`lors-hf merge` gives it back)")
        logger.info("the model is a LORS checkpoint: trained / evaluated as it is (no conversion)")
        return model

    with user_errors(ValueError, TypeError):
        config = lors_args.to_config(pretrained=pretrained)
        if config is None:
            return model
        if calibration_batches and config.init == "scratch":
            raise ScriptError("--lors_calibration_batches needs --lors_init svd or alternating "
                              "(scratch initialisation ignores the data)")
        return lorsify(model, config, calibration_data=calibration_batches or None,
                       calibration_damping=lors_args.lors_calibration_damping if calibration_batches else None)


def calibration_batches(dataset: Any, collator: Callable, batch_size: int, count: int) -> list[dict[str, Any]]:
    """The first ``count`` batches of ``dataset`` (in order, labels dropped), for data-aware conversion."""
    if count <= 0:
        return []
    from torch.utils.data import DataLoader

    batches = []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False):
        batches.append({k: v for k, v in batch.items() if k != "labels"})
        if len(batches) == count:
            break
    return batches


def write_parameter_report(model: torch.nn.Module, output_dir: str | os.PathLike) -> str:
    """Write ``parameter_report.txt`` and ``parameter_report.json`` into ``output_dir``; return the text.

    Example:
        >>> # print(write_parameter_report(model, "out"))
    """
    report = parameter_report(model)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = str(report)
    (out / PARAMETER_REPORT_TEXT).write_text(text + "\n", encoding="utf-8")
    (out / PARAMETER_REPORT_JSON).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return text


def parameter_metrics(model: torch.nn.Module) -> dict[str, float]:
    """The headline numbers of the parameter report, to log next to the other metrics."""
    report = parameter_report(model)
    stacks, total = report.stacks_total, report.total
    return {"params_total": total.lors, "params_dense_total": total.dense, "params_stacks": stacks.lors,
            "params_dense_stacks": stacks.dense, "params_stacks_reduction": round(stacks.reduction, 6)}


def weights_digest(model: torch.nn.Module) -> dict[str, str | None]:
    """SHA-256 digests of the shared LORS weights (None for a dense model) and of all parameters.

    Two models with equal digests hold bit-identical weights.

    Example:
        >>> # weights_digest(trainer.model)["shared"] == weights_digest(reloaded)["shared"]
    """
    def digest(items: list[tuple[str, torch.Tensor]]) -> str:
        sha = hashlib.sha256()
        for name, tensor in sorted(items):
            sha.update(name.encode())
            sha.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return sha.hexdigest()

    named = list(model.named_parameters())
    shared = [(n, p) for n, p in named if f".{SHARED_CONTAINER}." in f".{n}"]
    return {"shared": digest(shared) if shared else None, "all": digest(named)}


def write_ddp_sync(model: torch.nn.Module, output_dir: str | os.PathLike, wrapped: torch.nn.Module | None = None) -> Path:
    """Write ``<output_dir>/ddp_sync/rank<k>.json``: this process's rank, world size and weight digests.

    ``wrapped`` is the model as trained (``trainer.model_wrapped``); ``"ddp"`` in the file records whether
    it was a ``DistributedDataParallel`` (processes that train alone can also end with equal weights).

    Example:
        >>> # write_ddp_sync(trainer.model, args.output_dir, wrapped=trainer.model_wrapped)
    """
    from torch.nn.parallel import DistributedDataParallel

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world_size = torch.distributed.get_world_size() if distributed else 1
    path = Path(output_dir) / DDP_SYNC_DIR / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "world_size": world_size, "ddp": isinstance(wrapped, DistributedDataParallel),
              **weights_digest(model)}
    path.write_text(json.dumps(record), encoding="utf-8")
    return path


def push_output_dir(output_dir: str | os.PathLike, repo_id: str, token: str | None = None,
                    private: bool | None = None, revision: str | None = None) -> str:
    """Upload the saved model, tokenizer, model card, metrics and reports of ``output_dir`` to the Hub.

    Training checkpoints, logs, DDP digests and unfinished saves are left out; `revision` is a branch
    (created if needed).
    Returns the commit URL.

    Example:
        >>> # push_output_dir("out/minilm-lors", "me/minilm-lors", revision="main")
    """
    from huggingface_hub import HfApi

    from .persistence import STAGING_PREFIX, ensure_branch

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    ensure_branch(api, repo_id, revision, token)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), revision=revision,
                               ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**", f"{DDP_SYNC_DIR}/**",
                                                "training_args.bin", f"{STAGING_PREFIX}*/**"],
                               commit_message="Upload model trained with lors-hf")
    return str(commit)


def build_trainer(teacher: torch.nn.Module | None, distill_args: DistillArguments, **trainer_kwargs: Any):
    """A ``Trainer``, or a `DistillationTrainer` from `teacher` when ``--distill`` asked for one.

    Example:
        >>> # trainer = build_trainer(teacher, distill_args, model=model, args=training_args, train_dataset=ds)
    """
    if teacher is None:
        from transformers import Trainer

        return Trainer(**trainer_kwargs)
    from .distill import DistillationTrainer

    student = trainer_kwargs["model"]
    for field_name, alpha, term in (("hidden_size", distill_args.distill_alpha_hidden, "--distill_alpha_hidden"),
                                    ("vocab_size", distill_args.distill_alpha_kl, "--distill_alpha_kl")):
        ours = getattr(getattr(student, "config", None), field_name, None)
        theirs = getattr(getattr(teacher, "config", None), field_name, None)
        if alpha > 0 and ours is not None and theirs is not None and ours != theirs:
            raise ScriptError(f"the teacher's {field_name} is {theirs} but the model's {ours}: their "
                              f"{'hidden states' if field_name == 'hidden_size' else 'logits'} cannot be compared; "
                              f"give a teacher of the same {field_name}, or {term} 0")
    return DistillationTrainer(
        teacher_model=teacher, temperature=distill_args.distill_temperature, alpha_kl=distill_args.distill_alpha_kl,
        alpha_hidden=distill_args.distill_alpha_hidden, alpha_task=distill_args.distill_alpha_task, **trainer_kwargs)


def load_teacher(model: torch.nn.Module, distill_args: DistillArguments, model_class: Any,
                 **from_pretrained_kwargs: Any) -> torch.nn.Module | None:
    """The dense teacher of ``--distill`` (None without it): a copy of ``model``, taken before the conversion,
    or ``model_class.from_pretrained(--teacher_model_name_or_path, **from_pretrained_kwargs)``.

    Example:
        >>> # teacher = load_teacher(model, distill_args, AutoModelForCausalLM, dtype=torch.float32)
    """
    if not distill_args.distill:
        return None
    from .surgery import is_lorsified

    if distill_args.teacher_model_name_or_path is None and is_lorsified(model):
        raise ScriptError("--distill from a LORS checkpoint needs --teacher_model_name_or_path (the dense model "
                          "to imitate)")
    with user_errors():
        if distill_args.teacher_model_name_or_path is None:
            return copy.deepcopy(model)
        return model_class.from_pretrained(resolve_model_path(distill_args.teacher_model_name_or_path),
                                           **from_pretrained_kwargs)


def defer_push_to_hub(training_args: TrainingArguments) -> bool:
    """Turn off the ``Trainer``'s own pushes and return whether ``--push_to_hub`` was given.

    The scripts push once at the end instead (`push_trained_model`), with the LORS model card and the
    reports. Call it before building the ``Trainer``.
    """
    push_to_hub = training_args.push_to_hub
    training_args.push_to_hub = False
    return push_to_hub


def train_and_evaluate(trainer: Trainer, lors_args: LorsArguments,
                       eval_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None) -> None:
    """Train (``--do_train``), save the model, evaluate (``--do_eval``), write DDP digests (``--check_ddp_sync``).

    The train and eval metrics, logged and saved as ``{train,eval,all}_results.json``, also hold the sample
    count and `parameter_metrics`; ``eval_metrics(metrics)``, when given, returns task metrics to add to
    the evaluation's (run_clm: perplexity).

    Example:
        >>> # train_and_evaluate(trainer, lors_args, eval_metrics=lambda m: {"perplexity": math.exp(m["eval_loss"])})
    """
    args = trainer.args
    extra = parameter_metrics(trainer.model)
    if args.do_train:
        resume = resolve_resume(trainer.model, args.resume_from_checkpoint, args.output_dir)
        if resume is not None:
            _check_resumed_learning_rates(trainer, resume)
        result = trainer.train(resume_from_checkpoint=resume)
        metrics = {**result.metrics, "train_samples": len(trainer.train_dataset), **extra}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    trainer.save_model()
    if args.do_eval:
        metrics = {**trainer.evaluate(), "eval_samples": len(trainer.eval_dataset), **extra}
        if eval_metrics is not None:
            metrics.update(eval_metrics(metrics))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if lors_args.check_ddp_sync:
        write_ddp_sync(trainer.model, args.output_dir, wrapped=trainer.model_wrapped)


def _learning_rate_ratios(groups: list[dict[str, Any]], key: str) -> list[tuple[float, int]]:
    """Each optimizer group's peak learning rate relative to the largest, with the group's tensor count, in order."""
    rates = [group.get(key, group["lr"]) for group in groups]
    return [(round(rate / max(rates), 6), len(group["params"])) for rate, group in zip(rates, groups, strict=True)]


def _check_resumed_learning_rates(trainer: Trainer, checkpoint: str) -> None:
    """Refuse to resume a checkpoint whose optimizer had other learning-rate ratios between its groups
    (``--lors_b_lr_ratio`` / ``--lors_stack_lr_ratio``): loading its state fails deep in torch when the group
    count differs, and brings the old ratios back when it does not. The groups are compared one by one (the
    same set of ratios on other groups, stack 0.125x instead of lors_B 8x, is other training)."""
    path = Path(checkpoint) / "optimizer.pt"
    if not path.is_file():  # a checkpoint without an optimizer (save_only_model) or of a sharded backend
        return
    try:
        # memory-mapped: only the groups are read here; the Trainer loads the state itself afterwards
        saved_groups = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["param_groups"]
    except Exception:  # noqa: BLE001 - unreadable here: the Trainer's own loading decides
        return
    saved = _learning_rate_ratios(saved_groups, "initial_lr")
    if trainer.optimizer is not None:  # ours, over the LORS groups
        ours = _learning_rate_ratios(trainer.optimizer.param_groups, "lr")
        same = saved == ours
    else:  # the Trainer's own, built later: one learning rate for every group
        ours = [(1.0, "all")]
        same = {ratio for ratio, _ in saved} == {1.0}
    if not same:
        raise ScriptError(f"--resume_from_checkpoint {checkpoint} was trained with learning rates at {saved} (of "
                          f"the largest, tensors per group), these arguments give {ours}: resume with the "
                          "--lors_b_lr_ratio and --lors_stack_lr_ratio it was trained with")


def push_trained_model(trainer: Trainer, trainer_model_card: bool = False) -> str:
    """Push ``--output_dir`` to ``--hub_model_id`` (default: the directory's name); return the commit URL.

    ``trainer_model_card``: write the ``Trainer``'s model card first (the scripts do for a dense baseline;
    a LORS model saves its own). Call it on the main process only.

    Example:
        >>> # if push_to_hub and trainer.is_world_process_zero(): push_trained_model(trainer)
    """
    from .persistence import has_users_readme, write_model_card
    from .surgery import is_lorsified

    args = trainer.args
    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    if trainer_model_card:
        trainer.create_model_card(model_name=args.hub_model_id)
    elif is_lorsified(trainer.model):  # the saved card's load instructions name the local folder
        if not has_users_readme(args.output_dir):  # a README of the user's own is pushed as it is
            write_model_card(trainer.model, args.output_dir, repo_id=repo_id)
    return push_output_dir(args.output_dir, repo_id, args.hub_token, args.hub_private_repo,
                           getattr(args, "hub_revision", None))
