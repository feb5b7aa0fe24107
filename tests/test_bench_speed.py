"""scripts/bench_speed.py --smoke: times dense and LORS in one run and writes its section with the ratios."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_smoke_run_writes_the_ratios_it_measured(tmp_path):
    results_file, figures_file = tmp_path / "RESULTS.md", tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_speed.py"), "--smoke", "--results-file",
                           str(results_file), "--json", str(figures_file)], cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(figures_file.read_text())
    assert figures["stack_params_lors"] < figures["stack_params_dense"]
    assert figures["train_ratio"] == figures["train_step_s"]["lors"] / figures["train_step_s"]["dense"] > 0
    assert figures["decode_ratio"] == figures["decode_step_s"]["lors"] / figures["decode_step_s"]["dense"] > 0
    text = results_file.read_text()
    section = text[text.index("<!-- bench_speed_cpu:start -->"):text.index("<!-- bench_speed_cpu:end -->")]
    assert "`python scripts/bench_speed.py --smoke" in section
    assert f"| {figures['train_ratio']:.3f} | <= 1.05 |" in section
    assert f"| {figures['decode_ratio']:.3f} | <= 1.10 |" in section
