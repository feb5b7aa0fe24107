"""The ``lors-hf`` command line: ``demo``, ``convert``, ``report`` and ``merge``.

    lors-hf demo                                   # LORS on a real model and real data, ~5 min on a CPU
    lors-hf convert ./bert-dir ./bert-lors --target-reduction 0.5 --init svd
    lors-hf report ./bert-lors [--json]
    lors-hf merge ./bert-lors ./bert-dense         # a checkpoint stock transformers loads

Mistakes (a missing directory, a rank that does not fit) end with one line ``error: ...`` on stderr and
exit status 1 (2 for unparsable arguments, 130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

AUXILIARY_PATTERNS = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json", "*.model",
                      "chat_template*", "preprocessor_config.json", "processor_config.json")
"""Files of a model directory (tokenizer, processor) that `convert` and `merge` copy next to the new weights."""
TOKENIZER_PATTERNS = ("tokenizer.json", "vocab*", "merges.txt", "*.model")
"""Files of which a model directory needs one for its tokenizer to load (``--calibration-file``)."""
CALIBRATION_SAMPLES = 128
"""Lines of the ``--calibration-file`` that `convert` uses unless ``--calibration-samples`` says otherwise."""
CALIBRATION_MAX_LENGTH = 128
"""Tokens per calibration sample unless ``--max-length`` says otherwise."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


class CommandError(Exception):
    """A user mistake: printed as ``error: <message>``, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    """The ``lors-hf`` argument parser (subcommands demo, convert, report, merge).

    Example:
        >>> build_parser().parse_args(["report", "some/dir", "--json"]).json
        True
    """
    parser = _Parser(prog="lors-hf", description="LORS (Low-rank Residual Structure) for Hugging Face transformers.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"lors-hf {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help="convert the real MiniLM, fine-tune against the dense model, plot",
                               description="Convert the pretrained all-MiniLM-L6-v2 to LORS (about 50% fewer stack "
                               "parameters), check its output fidelity, fine-tune it and the dense model on Rotten "
                               "Tomatoes sentiment, compare accuracy, save and reload it, plot the training curves.")
    demo.add_argument("--output-dir", default="lors-demo", help="where results go (default: ./lors-demo)")
    demo.add_argument("--quick", action="store_true", help="a seconds-long smoke version (tiny slices)")
    demo.add_argument("--threads", type=_threads, default=None,
                      help="torch CPU threads (default: torch's, or 1 when other processes keep the CPUs busy)")
    demo.set_defaults(handler=_demo)

    convert = commands.add_parser("convert", help="a dense model directory or Hub id -> a LORS checkpoint",
                                  description="Convert a dense checkpoint to LORS and save it (weights, config, "
                                  "tokenizer files, model card); prints the parameter report.")
    convert.add_argument("model", help="model directory, Hub id (online), or bundled:minilm / bundled:smollm2 "
                         "(the offline assets)")
    convert.add_argument("output", help="directory to write the LORS checkpoint to")
    budget = convert.add_mutually_exclusive_group()
    budget.add_argument("--rank", type=_rank, default=None, help="private rank per layer: an int or 'full' (default 32)")
    budget.add_argument("--target-reduction", type=float, default=None,
                        help="instead of a rank: the fraction of the stacks' parameters to remove, e.g. 0.5")
    convert.add_argument("--init", choices=["svd", "alternating", "scratch"], default="svd",
                         help="how to split the pretrained weights (default: svd)")
    convert.add_argument("--target-modules", default=None,
                         help="comma-separated projection names to share, matched as suffixes of the module path; "
                              "* stands for one name, e.g. layer.*.attention.self.query (default: every projection "
                              "in the stacks)")
    convert.add_argument("--exclude-modules", default=None, help="comma-separated projection names to keep dense")
    convert.add_argument("--calibration-file", default=None,
                         help="data-aware conversion: a text file, one sample per line (needs the model's tokenizer)")
    convert.add_argument("--calibration-samples", type=_positive_int, default=None,
                         help=f"lines of the --calibration-file to use (default {CALIBRATION_SAMPLES})")
    convert.add_argument("--max-length", type=_positive_int, default=None,
                         help=f"tokens per --calibration-file sample (default {CALIBRATION_MAX_LENGTH}, or the "
                              "model's limit if lower)")
    convert.add_argument("--calibration-damping", type=_damping, default=None,
                         help="ridge on the calibration inputs' moments, a fraction of their mean diagonal "
                              "(default: lors_hf.calibration.DEFAULT_DAMPING)")
    convert.set_defaults(handler=_convert)

    report = commands.add_parser("report", help="parameter report of a dense or LORS checkpoint directory")
    report.add_argument("model", help="model directory, Hub id (online), or bundled:minilm / bundled:smollm2")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.set_defaults(handler=_report)

    merge = commands.add_parser("merge", help="a LORS checkpoint -> a dense checkpoint that stock transformers loads")
    merge.add_argument("model", help="LORS checkpoint directory (or Hub id, online)")
    merge.add_argument("output", help="directory to write the dense checkpoint to")
    merge.set_defaults(handler=_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lors-hf``; returns 0 or exits with status 1 (mistake) / 2 (bad arguments).

    Example:
        >>> main(["report", "some/model-dir"])  # doctest: +SKIP
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own bar (convert) or progress lines (demo)
    try:
        args.handler(args)
    except CommandError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C: convert and merge have put their output folder back as it was
        print("\nerror: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    return 0


# --------------------------------------------------------------------------------------------- helpers


def _int_at_least(text: str, minimum: int, what: str, alternative: str = "") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: an int >= {minimum}{alternative}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"invalid {what} {value}: must be >= {minimum}")
    return value


def _rank(text: str) -> int | str:
    return text if text == "full" else _int_at_least(text, 0, "rank", alternative=" or 'full'")


def _threads(text: str) -> int:
    return _int_at_least(text, 1, "thread count")


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "count")


def _damping(text: str) -> float:
    from .calibration import checked_damping

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid damping {text!r}: a number >= 0, e.g. 0.1") from None
    try:
        return checked_damping(value, f"invalid damping {value}:")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [name.strip() for name in text.split(",") if name.strip()]


@contextlib.contextmanager
def _guard(action: str, *kinds: type[BaseException]) -> Iterator[None]:
    """Turn the errors that bad input causes into `CommandError` (``error: <action>: <message>``)."""
    from .training_args import ScriptError, user_errors

    try:
        with user_errors(*kinds):
            yield
    except ScriptError as err:
        raise CommandError(f"{action}: {err}") from None


def _check_not_empty(path: str, what: str) -> None:
    if not path.strip():  # Path("") is the current directory: an unset shell variable ("$OUT") would name it
        raise CommandError(f"the {what} is an empty path: name a directory (. for the current one)")


def _check_source(path: str) -> None:
    _check_not_empty(path, "model")
    looks_local = path.startswith(("/", "./", "../", "~")) or os.path.exists(path)
    folder = Path(path).expanduser()
    if looks_local and not (folder / "config.json").is_file():
        what = ("a file, not a model directory" if folder.is_file() else
                "no such directory" if not folder.is_dir() else "no config.json in it")
        raise CommandError(f"{path}: {what}")


def _loading(path: str) -> str:
    """What a failed load was doing; a name with no local directory was read as a Hub id, and says so."""
    if Path(path).expanduser().exists():
        return f"loading {path}"
    return f"loading {path} (no local directory of that name, so it was looked up as a Hub id)"


def _check_output(path: str, source: str) -> None:
    """`source`: the model as `_local_or_hub` resolved it (a ``bundled:`` name is its folder)."""
    _check_not_empty(path, "output")
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise CommandError(f"{path} exists and is not a directory")
    if target.is_symlink() and not target.exists():
        raise CommandError(f"{path} is a symbolic link to {os.readlink(target)}, which does not exist")
    if target.exists() and Path(source).expanduser().exists() and target.resolve() == Path(source).expanduser().resolve():
        raise CommandError(f"{path}: the output must differ from the input")
    # before the load and conversion (minutes for a large model), not at the save after them
    folder = next(p for p in (target.absolute(), *target.absolute().parents) if p.exists())
    if not folder.is_dir():
        raise CommandError(f"{path}: {folder} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lors-hf-write-check-", dir=folder))
    except OSError as err:
        raise CommandError(f"{path}: cannot write into {folder} ({err.strerror or err})") from None


def load_model(path: str) -> Any:
    """Load a checkpoint with the class its config names (``architectures``), else ``AutoModel``.

    LORS checkpoints come back as LORS models (importing lors_hf hooks ``from_pretrained``).

    Example:
        >>> # model = load_model("out/minilm-lors")
    """
    import transformers

    from . import persistence  # noqa: F401  (the from_pretrained hooks)

    config = transformers.AutoConfig.from_pretrained(path)
    architectures = getattr(config, "architectures", None) or []
    model_class = next((getattr(transformers, name) for name in architectures if hasattr(transformers, name)),
                       transformers.AutoModel)
    return model_class.from_pretrained(path, config=config)


def _copy_auxiliary_files(source: str, output: Path) -> list[str]:
    """Copy tokenizer / processor files of a local `source`; for a Hub id, save its tokenizer if it has one."""
    copied = []
    folder = Path(source).expanduser()
    if folder.is_dir():
        for pattern in AUXILIARY_PATTERNS:
            for path in sorted(folder.glob(pattern)):
                if path.is_file() and path.name not in copied:
                    shutil.copy2(path, output / path.name)
                    copied.append(path.name)
        return copied
    try:
        from transformers import AutoTokenizer

        copied = [Path(p).name for p in AutoTokenizer.from_pretrained(source).save_pretrained(output)]
    except (OSError, ValueError, KeyError):
        pass  # a model without a tokenizer
    return copied


def _save_with_auxiliary_files(model: Any, source: str, output: Path) -> list[str]:
    """Save `model` and `source`'s tokenizer / processor files into `output` in one staged step: a failure
    leaves `output` as it was, and new tokenizer files replace all of an earlier model's there."""
    from .persistence import MODEL_CARD, has_users_readme, staged_save
    from .surgery import is_lorsified

    with staged_save(output, replaced_together=AUXILIARY_PATTERNS) as staging:
        # a LORS model's card names the folder to load from: `output`, not the staging folder
        model.save_pretrained(staging, **({"repo_id": os.fspath(output)} if is_lorsified(model) else {}))
        card = staging / MODEL_CARD
        if card.exists() and has_users_readme(output):
            card.unlink()  # a README of the user's own stays, as with save_pretrained into `output`
        return _copy_auxiliary_files(source, staging)


def _local_or_hub(path: str) -> str:
    """`path` with ``~`` expanded when it names a local folder, ``bundled:minilm`` / ``bundled:smollm2`` as the
    offline assets' folders (as in the scripts), else as given (a Hub id)."""
    if path.startswith("bundled:"):
        from .training_args import ScriptError, resolve_model_path

        try:
            return resolve_model_path(path)
        except ScriptError as err:
            raise CommandError(str(err)) from None
    local = Path(path).expanduser()
    return str(local) if local.exists() else path


def _progress(total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", file=sys.stderr,
                bar_format="{desc:<60.60} {n_fmt}/{total_fmt} |{bar:20}| [{elapsed}]")


# -------------------------------------------------------------------------------------------- commands


def _demo(args: argparse.Namespace) -> None:
    import torch

    from .demo import choose_threads, run_demo

    _check_not_empty(args.output_dir, "--output-dir")
    threads, reason = (args.threads, "--threads") if args.threads else choose_threads()
    torch.set_num_threads(threads)
    print(f"torch CPU threads: {threads} ({reason})")
    with _guard("demo"):
        run_demo(args.output_dir, quick=args.quick)


def _convert(args: argparse.Namespace) -> None:
    from .config import LorsConfig
    from .report import parameter_report
    from .surgery import get_lors_config, is_lorsified, lorsify

    _check_source(args.model)
    source = _local_or_hub(args.model)
    _check_output(args.output, source)
    if args.calibration_file is not None and not Path(args.calibration_file).is_file():
        what = "a directory, not a text file" if Path(args.calibration_file).is_dir() else "no such file"
        raise CommandError(f"--calibration-file {args.calibration_file}: {what}")
    if args.calibration_file is not None and args.init == "scratch":
        raise CommandError("--calibration-file needs --init svd or alternating")
    calibration_options = {"--calibration-samples": args.calibration_samples, "--max-length": args.max_length,
                           "--calibration-damping": args.calibration_damping}
    for option, value in calibration_options.items():
        if value is not None and args.calibration_file is None:
            raise CommandError(f"{option} applies to data-aware conversion: add --calibration-file")
    with _guard("convert", ValueError, TypeError):
        config = LorsConfig(rank=args.rank, target_reduction=args.target_reduction, init=args.init,
                            target_modules=_names(args.target_modules), exclude_modules=_names(args.exclude_modules))
    steps = ["load", "calibrate", "convert", "save"] if args.calibration_file else ["load", "convert", "save"]
    output = Path(args.output).expanduser()
    with _progress(len(steps), "convert") as bar:
        bar.set_description_str(f"convert: loading {args.model}")
        with _guard(_loading(args.model)):
            model = load_model(source)
        if is_lorsified(model):
            raise CommandError(f"{args.model} is already a LORS checkpoint (lors-hf merge gives the dense one)")
        bar.update()
        calibration = None
        if args.calibration_file:
            bar.set_description_str("convert: reading the calibration data")
            calibration = _calibration_batches(args, source, model)
            bar.update()
        bar.set_description_str(f"convert: converting ({'data-aware, ' if calibration else ''}init={config.init})")
        with _guard("convert"):
            lorsify(model, config, calibration_data=calibration, calibration_damping=args.calibration_damping)
        bar.update()
        bar.set_description_str(f"convert: saving {output}")
        with _guard("save"):
            copied = _save_with_auxiliary_files(model, source, output)
        bar.update()
        bar.set_description_str("convert: done")
    print(parameter_report(model))
    plan = get_lors_config(model)
    kept_dense = plan.dense_groups()
    print(f"LORS checkpoint written to {output} (init={config.init}, private ranks {plan.private_ranks() or [0]}"
          + (f", data-aware on {sum(len(b['input_ids']) for b in calibration)} samples" if calibration else "")
          + (f"; {', '.join(kept_dense)} kept dense: LORS would not make them smaller" if kept_dense else "")
          + (f"; copied {', '.join(copied)}" if copied else "") + ")")


def _position_limit(model: Any, tokenizer: Any) -> int | None:
    """The most tokens `model` takes in one sample (its position table, or its tokenizer's limit), if it says."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]  # the tokenizer's "no limit" is 1e30
    return min(limits) if limits else None


def _calibration_batches(args: argparse.Namespace, source: str, model: Any) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    try:
        text = Path(args.calibration_file).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CommandError(f"--calibration-file {args.calibration_file} is not UTF-8 text ({err.reason} at byte "
                           f"{err.start}): give plain text, one sample per line") from None
    samples = CALIBRATION_SAMPLES if args.calibration_samples is None else args.calibration_samples
    lines = [line for line in (line.strip() for line in text.splitlines()) if line][:samples]
    if not lines:
        raise CommandError(f"--calibration-file {args.calibration_file} has no text")
    folder = Path(source)
    if folder.is_dir() and not any(any(folder.glob(glob)) for glob in TOKENIZER_PATTERNS):
        # transformers would build a near-empty tokenizer from config.json alone: every word one unknown token
        raise CommandError(f"{args.model} has no tokenizer files ({', '.join(TOKENIZER_PATTERNS)}): "
                           "--calibration-file needs the model's tokenizer; copy it into the folder")
    with _guard(f"loading the tokenizer of {args.model}"):
        tokenizer = AutoTokenizer.from_pretrained(source)
    limit = _position_limit(model, tokenizer)
    if args.max_length is not None and limit is not None and args.max_length > limit:
        # a longer sample failed in the calibration run, with an error about the calibration data's format
        raise CommandError(f"--max-length {args.max_length} exceeds the {limit} tokens {args.model} takes per "
                           f"sample: give at most {limit}")
    max_length = args.max_length or min(CALIBRATION_MAX_LENGTH, limit or CALIBRATION_MAX_LENGTH)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    # a tokenizer with no token to pad with (no padding, end-of-text or unknown token) gets one line per batch
    batch_size = 16 if tokenizer.pad_token is not None else 1
    with _guard(f"tokenizing --calibration-file {args.calibration_file}"):
        return [dict(tokenizer(lines[i:i + batch_size], padding=batch_size > 1, truncation=True,
                               max_length=max_length, return_tensors="pt")) for i in range(0, len(lines), batch_size)]


def _report(args: argparse.Namespace) -> None:
    from .report import parameter_report
    from .surgery import is_lorsified

    _check_source(args.model)
    with _guard(_loading(args.model)):
        model = load_model(_local_or_hub(args.model))
    report = parameter_report(model)
    if args.json:
        print(json.dumps({"model": args.model, "lors": is_lorsified(model), **report.to_dict()}, indent=2))
        return
    kind = "LORS" if is_lorsified(model) else "dense (LORS column = as it is now)"
    print(f"{args.model}: {type(model).__name__}, {kind}")
    print(report)


def _merge(args: argparse.Namespace) -> None:
    from .persistence import MODEL_CARD, is_lors_model_card
    from .surgery import is_lorsified, merge_and_unload

    _check_source(args.model)
    source = _local_or_hub(args.model)
    _check_output(args.output, source)
    with _guard(_loading(args.model)):
        model = load_model(source)
    if not is_lorsified(model):
        raise CommandError(f"{args.model} is not a LORS checkpoint (its config.json has no lors_config)")
    output = Path(args.output).expanduser()
    with _guard("merge"):
        merge_and_unload(model)
        copied = _save_with_auxiliary_files(model, source, output)
        card = output / MODEL_CARD
        if card.is_file() and is_lors_model_card(card):  # an earlier LORS checkpoint's card: wrong for this one
            card.unlink()
    print(f"dense checkpoint ({type(model).__name__}, {model.num_parameters():,} parameters) written to {output}; "
          "stock transformers loads it without lors_hf" + (f" (copied {', '.join(copied)})" if copied else ""))


if __name__ == "__main__":
    sys.exit(main())
