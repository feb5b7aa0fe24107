"""Shared helpers of the benchmark scripts: write one script's section of docs/RESULTS.md (CPU and GPU runs
in separate sections) and set up a training run (threads, quiet warnings).

Each benchmark owns the block between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; running it
again replaces only that block, so every figure in the file sits next to the command that printed it.

Example:
    >>> # update_section("bench_speed", "## Speed\\n...", results_file="docs/RESULTS.md")
"""

from __future__ import annotations

import os
import platform
import re
import warnings
from pathlib import Path

import torch

RESULTS_FILE = Path(__file__).resolve().parent.parent / "docs" / "RESULTS.md"
HEADER = "# lors-hf results\n\nEvery section below is written by the benchmark script named in it; rerun the command to reproduce.\n"


def machine_description() -> str:
    """One line naming the hardware and software a figure was measured on."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    import transformers

    return f"{device}, torch {torch.__version__}, transformers {transformers.__version__}"


def refuse_smoke_into_docs(parser, args) -> None:
    """Exit with a parser error when a ``--smoke`` run would write its tiny figures into docs/ (over the real
    runs' in RESULTS.md, or its plots, which go next to the results file, over theirs): a smoke run needs a
    ``--results-file`` in another folder."""
    if args.smoke and (args.results_file is None or Path(args.results_file).resolve().parent == RESULTS_FILE.parent):
        parser.error("--smoke writes to a scratch file: give --results-file outside docs/ (docs/ is for real runs).")


def update_section(name: str, markdown: str, results_file: str | os.PathLike = RESULTS_FILE) -> Path:
    """Replace (or append) the block of benchmark `name` in the results file and return its path."""
    path = Path(results_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    block = f"<!-- {name}:start -->\n{markdown.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    write_atomically(path, text)
    return path


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file: a run stopped mid-write leaves the old file whole."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def device_section(section: str, device: str) -> str:
    """The RESULTS.md section (and plot-name prefix) of a run on ``device``: CPU and CUDA runs keep separate sections."""
    return section if device == "cpu" else f"{section}_gpu"


def setup_run(threads: int) -> None:
    """Silence transformers' warnings and torch's "Initializing zero-element tensors"; use ``threads`` CPU threads.

    ``threads`` 0 keeps torch's default.
    """
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
    hf_logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)


def run_in_processes(function, calls: list[tuple], jobs: int) -> list:
    """``function(*call)`` for every call, in order; with ``jobs`` > 1 that many at once in spawned worker processes.

    `function` must be a module-level function of the calling script (so the workers can import it), and each
    run must depend only on its arguments: then running several at once changes the wall time, not the figures.

    Example:
        >>> run_in_processes(pow, [(2, 3), (3, 2)], jobs=1)
        [8, 9]
    """
    if jobs <= 1:
        return [function(*call) for call in calls]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(jobs, len(calls)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(function, *call) for call in calls]
        return [future.result() for future in futures]
