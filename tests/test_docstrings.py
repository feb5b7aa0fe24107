"""The usage examples in the package's docstrings run and print what they show (`--doctest-modules`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lors_hf"


def test_docstring_examples_run(tmp_path):
    """Two examples had gone stale unseen (a metric loaded through the Hub, a missing import)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--doctest-modules", str(PACKAGE), "-q", "-p",
                           "no:cacheprovider"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)  # examples write files
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
