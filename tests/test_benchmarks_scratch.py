"""The benchmarks' --smoke runs: bench_scratch and bench_detr end to end; no smoke run of any bench_* writes into docs/.

Both scripts write their sections into one temporary results file; the tables must hold a numeric figure
for every variant, the parameter reductions must be the ones asked for, and the plots must exist.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRATCH_VARIANTS = ("dense", "lors-60", "lors-70", "shared", "shallow")


def _run(script: str, *args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--smoke", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    results_file = out / "RESULTS.md"
    _run("bench_scratch.py", "--results-file", str(results_file))
    _run("bench_detr.py", "--results-file", str(results_file), "--data-dir", str(out / "data"))
    return results_file


def _section(results_file: Path, name: str) -> str:
    text = results_file.read_text(encoding="utf-8")
    match = re.search(rf"<!-- {name}:start -->(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"section {name} missing from {results_file}"
    return match.group(1)


def _table(section: str) -> dict[str, list[str]]:
    """Rows of the section's markdown table keyed by the first word of their first cell."""
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| variant") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0].split()[0]] = cells
    return rows


def _columns(section: str) -> dict[str, dict[str, str]]:
    """Rows of the section's markdown table keyed by variant, each a dict from column header to cell."""
    header = next(line for line in section.splitlines() if line.startswith("| variant"))
    names = [c.strip() for c in header.strip().strip("|").split("|")]
    return {variant: dict(zip(names, cells, strict=True)) for variant, cells in _table(section).items()}


DETR_FIGURES = ("val AP %", "val AP50 %", "val AP75 %", "val AR@10 %", "test AP %", "test AP50 %", "final loss")


def _figures(row: dict[str, str]) -> list[str]:
    return [row[name] for name in DETR_FIGURES]


def _number(cell: str) -> float:
    match = re.search(r"[-+]?\d[\d,]*\.?\d*", cell)
    assert match, f"no number in {cell!r}"
    return float(match.group(0).replace(",", ""))


def test_scratch_table_has_every_variant(results: Path) -> None:
    section = _section(results, "bench_scratch")
    assert "python scripts/bench_scratch.py --smoke" in section
    rows = _table(section)
    assert set(rows) == set(SCRATCH_VARIANTS)
    for name, cells in rows.items():
        ppl = _number(cells[6])  # "mean ± spread"
        assert math.isfinite(ppl) and 1.0 < ppl < 200.0, (name, cells[6])
        assert all(math.isfinite(_number(v)) for v in cells[7].split("/")), cells[7]
    stack = {name: _number(cells[3]) for name, cells in rows.items()}
    assert stack["lors-60"] <= 0.4 * stack["dense"] and stack["lors-70"] <= 0.3 * stack["dense"]
    assert stack["shared"] < stack["lors-70"] <= stack["lors-60"]
    assert abs(stack["shallow"] / stack["lors-60"] - 1) < 0.25  # the equal-parameter baseline
    assert re.search(r"`lors-60` within 2% of dense perplexity: (HIT|MISSED)", section)
    for plot in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section):
        assert (results.parent / plot).stat().st_size > 1000


def test_detr_table_has_both_variants(results: Path) -> None:
    section = _section(results, "bench_detr")
    assert "python scripts/bench_detr.py --smoke" in section
    rows = _columns(section)
    assert set(rows) == {"dense", "lors"}
    for name, row in rows.items():
        for column in DETR_FIGURES[:-1]:  # val and test COCO metrics in percent
            assert 0.0 <= _number(row[column]) <= 100.0, (name, column, row[column])
        assert math.isfinite(_number(row["final loss"])), row["final loss"]
        assert _number(row["peak lr"]) == 3e-4  # the smoke preset's, for both
    decoder_change = float(re.search(r"\(([-+][\d.]+)%\)", rows["lors"]["decoder params"]).group(1))
    assert decoder_change <= -70.0
    assert "(+0.0%)" in rows["dense"]["decoder params"]
    assert "8 val / 8 test images" in section and re.search(r"LORS minus dense, in points: val AP .*; test AP", section)
    plots = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section)
    assert plots and all((results.parent / plot).is_file() for plot in plots)


def test_scratch_long_preset_runs_in_parallel_with_the_same_figures(results: Path, tmp_path: Path) -> None:
    """--preset long trains two runs at once in worker processes and writes its own section; with --smoke's
    shapes every run's perplexity must equal the serial default run's."""
    parallel_file = tmp_path / "RESULTS.md"
    _run("bench_scratch.py", "--preset", "long", "--results-file", str(parallel_file))
    section = _section(parallel_file, "bench_scratch_long")
    assert "preset `long`" in section and "2 run(s) at once" in section
    serial, parallel = _table(_section(results, "bench_scratch")), _table(section)
    assert set(parallel) == set(SCRATCH_VARIANTS)
    for name in SCRATCH_VARIANTS:
        assert parallel[name][7] == serial[name][7], name  # per-seed test perplexities
    assert "<!-- bench_scratch:start -->" not in parallel_file.read_text(encoding="utf-8")


def test_scratch_variant_subset_and_budget_write_their_own_section(results: Path, tmp_path: Path) -> None:
    """--variants trains only the named ones (plus dense, the reference) and --steps away from the preset's
    budget names its own section; the runs that remain give the full run's figures, and the targets list
    only comparisons the table can make."""
    subset_file = tmp_path / "RESULTS.md"
    _run("bench_scratch.py", "--variants", "shallow", "lors-60", "--steps", "4", "--results-file", str(subset_file))
    section = _section(subset_file, "bench_scratch_steps4_dense_lors-60_shallow")
    assert ", 4 steps, variants dense, lors-60, shallow only" in section
    full, subset = _table(_section(results, "bench_scratch")), _table(section)
    assert set(subset) == {"dense", "lors-60", "shallow"}
    for name in subset:
        assert subset[name][7] == full[name][7], name  # per-seed test perplexities
    targets = section.split("Targets (computed from the table):")[1]
    assert "`lors-60` better than `shallow`" in targets
    assert "shared" not in targets and "lors-70" not in targets
    assert "Equal-parameter baseline" in section


def test_scratch_b_lr_ratio_changes_only_the_lors_runs(results: Path, tmp_path: Path) -> None:
    """--b-lr-ratio 8 trains lors_B 8x faster and writes its own section: the models without private factors
    (dense, shared, shallow) must give the default run's figures, the LORS ones others."""
    ratio_file = tmp_path / "RESULTS.md"
    _run("bench_scratch.py", "--b-lr-ratio", "8", "--results-file", str(ratio_file))
    section = _section(ratio_file, "bench_scratch_b8")
    assert "`lors_B` at 8x the learning rate" in section and "lors_parameter_groups" in section
    default, faster_b = _table(_section(results, "bench_scratch")), _table(section)
    for name in ("dense", "shared", "shallow"):
        assert faster_b[name][7] == default[name][7], name
    for name in ("lors-60", "lors-70"):
        assert faster_b[name][7] != default[name][7], name


def test_scratch_stack_lr_ratio_slows_only_the_lors_stack(results: Path, tmp_path: Path) -> None:
    """--stack-lr-ratio 0.5 halves the LORS models' shared weights and lors_A (lors_B keeps its ratio to them)
    and writes its own section: the dense, shared and shallow runs must not change, the LORS ones must."""
    ratio_file = tmp_path / "RESULTS.md"
    _run("bench_scratch.py", "--b-lr-ratio", "8", "--results-file", str(ratio_file))
    _run("bench_scratch.py", "--b-lr-ratio", "8", "--stack-lr-ratio", "0.5", "--results-file", str(ratio_file))
    section = _section(ratio_file, "bench_scratch_b8_s0.5")
    assert "shared weights and `lors_A` at 0.5x, `lors_B` at 4x" in section
    default, b_only, slower_stack = (_table(_section(results, "bench_scratch")),
                                     _table(_section(ratio_file, "bench_scratch_b8")), _table(section))
    for name in ("dense", "shared", "shallow"):
        assert slower_stack[name][7] == default[name][7], name
    for name in ("lors-60", "lors-70"):
        assert slower_stack[name][7] != b_only[name][7], name


LIMITED = "bench_scratch_chars200_dense_shallow"  # the section of `--variants shallow --train-chars 200`


@pytest.fixture(scope="module")
def limited(tmp_path_factory) -> Path:
    """A results file with a data-limited run: dense and shallow on the first 200 training characters."""
    results_file = tmp_path_factory.mktemp("limited") / "RESULTS.md"
    _run("bench_scratch.py", "--variants", "shallow", "--train-chars", "200", "--results-file", str(results_file))
    return results_file


def test_scratch_train_chars_and_dropout_write_their_own_sections(results: Path, limited: Path,
                                                                   tmp_path: Path) -> None:
    """--train-chars trains on a prefix of the train split (many epochs) and --dropout turns dropout on for every
    variant; each writes its own section, says so in its setup, and changes the figures."""
    dropped_file = tmp_path / "RESULTS.md"
    _run("bench_scratch.py", "--variants", "shallow", "--train-chars", "200", "--dropout", "0.5",
         "--results-file", str(dropped_file))
    limited_text = _section(limited, LIMITED)
    dropped = _section(dropped_file, "bench_scratch_chars200_drop0.5_dense_shallow")
    assert "the first 200 characters of the train split" in limited_text and "no dropout" in limited_text
    assert "(2.56 epochs of 200 training characters)" in limited_text  # 4 steps x 4 x 32 tokens
    assert "dropout 0.5 (embeddings, residuals, attention)" in dropped
    default = _columns(_section(results, "bench_scratch"))
    limited_rows, dropped_rows = _columns(limited_text), _columns(dropped)
    assert set(limited_rows) == {"dense", "shallow"}
    for name in ("dense", "shallow"):
        assert limited_rows[name]["per seed"] != default[name]["per seed"], name
        assert dropped_rows[name]["per seed"] != limited_rows[name]["per seed"], name
        assert _number(limited_rows[name]["train ppl"]) > 1, name


def test_scratch_eval_every_reports_the_best_validation_step_without_changing_training(limited: Path,
                                                                                      tmp_path: Path) -> None:
    """--eval-every scores validation during training and reports the test perplexity at each run's best
    validation step; the periodic evaluations leave the training itself (the final figures) unchanged."""
    periodic_file = tmp_path / "RESULTS.md"
    _run("bench_scratch.py", "--variants", "shallow", "--train-chars", "200", "--eval-every", "1",
         "--results-file", str(periodic_file))
    name = LIMITED
    plain, periodic = _columns(_section(limited, name)), _columns(_section(periodic_file, name))
    assert "test ppl at best val (step per seed)" not in plain["dense"]
    assert "validation scored every 1 steps" in _section(periodic_file, name)
    for variant in ("dense", "shallow"):
        assert periodic[variant]["per seed"] == plain[variant]["per seed"], variant
        best = periodic[variant]["test ppl at best val (step per seed)"]
        # in 4 smoke steps from scratch the validation loss falls at every step: the best is the last step,
        # the very model the final figures score
        assert best.endswith("(4 / 4)"), best
        assert _number(best) == _number(periodic[variant]["test ppl (mean ± spread)"]), variant


@pytest.mark.parametrize(("flags", "message"), [(["--train-chars", "60"], "--train-chars 60 is too short"),
                                                (["--dropout", "1"], "--dropout must be in [0, 1)"),
                                                (["--eval-every", "-5"], "--eval-every must be >= 0")])
def test_scratch_rejects_too_little_training_text_dropout_of_one_or_negative_eval_every(
        flags: list[str], message: str, tmp_path: Path) -> None:
    # --results-file: if the check ever went missing, the smoke run must not write into docs/RESULTS.md
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_scratch.py"), "--smoke", *flags,
                           "--results-file", str(tmp_path / "RESULTS.md")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_detr_two_jobs_give_the_serial_figures(results: Path, tmp_path: Path) -> None:
    """--jobs 2 trains dense and LORS at once in worker processes: the same losses and metrics as one by one."""
    parallel_file = tmp_path / "RESULTS.md"
    _run("bench_detr.py", "--jobs", "2", "--results-file", str(parallel_file), "--data-dir", str(tmp_path / "data"))
    section = _section(parallel_file, "bench_detr")
    assert "2 run(s) at once" in section
    serial, parallel = _columns(_section(results, "bench_detr")), _columns(section)
    for name in ("dense", "lors"):
        assert _figures(parallel[name]) == _figures(serial[name]), name


def test_detr_backbone_norm_is_trainable_by_default(results: Path, tmp_path: Path) -> None:
    """The default backbone has trainable BatchNorm; --backbone-norm frozen keeps DETR's frozen one and trains
    differently."""
    assert "trainable BatchNorm in place of DETR's frozen one" in _section(results, "bench_detr")
    frozen_file = tmp_path / "RESULTS.md"
    _run("bench_detr.py", "--backbone-norm", "frozen", "--results-file", str(frozen_file),
         "--data-dir", str(tmp_path / "data"))
    section = _section(frozen_file, "bench_detr_frozen_bn")
    assert "frozen-identity BatchNorm as DETR builds it" in section
    batch, frozen = _columns(_section(results, "bench_detr")), _columns(section)
    assert frozen["dense"]["final loss"] != batch["dense"]["final loss"]


def _detr_run_in_own_section(tmp_path: Path, section: str, *args: str) -> str:
    """Run bench_detr --smoke with `args` into a fresh results file; the preset's section must stay unwritten, and
    `section` is returned."""
    results_file = tmp_path / "RESULTS.md"
    _run("bench_detr.py", *args, "--results-file", str(results_file), "--data-dir", str(tmp_path / "data"))
    assert "<!-- bench_detr:start -->" not in results_file.read_text(encoding="utf-8")
    return _section(results_file, section)


def test_detr_other_learning_rate_or_seed_writes_its_own_section(results: Path, tmp_path: Path) -> None:
    """A peak lr other than the preset's and a seed other than 0 write ``bench_detr_lr<value>_seed<N>`` and leave
    the preset's section alone."""
    section = _detr_run_in_own_section(tmp_path, "bench_detr_lr0.0001_seed1", "--lr", "1e-4", "--seed", "1")
    assert "at peak lr 0.0001, seed 1" in section
    rows = _columns(section)
    assert rows["dense"]["peak lr"] == rows["lors"]["peak lr"] == "0.0001"
    assert rows["dense"]["final loss"] != _columns(_section(results, "bench_detr"))["dense"]["final loss"]


def test_detr_other_budget_writes_its_own_section(results: Path, tmp_path: Path) -> None:
    """--steps and --num-test away from the preset's write ``bench_detr_steps<N>_test<N>`` (a shorter run must not
    replace the preset's figures), and the section says the budget it ran."""
    section = _detr_run_in_own_section(tmp_path, "bench_detr_steps2_test0", "--steps", "2", "--num-test", "0")
    assert "2 steps" in section
    assert _columns(section)["dense"]["final loss"] != _columns(_section(results, "bench_detr"))["dense"]["final loss"]


def test_detr_per_variant_learning_rate_changes_only_that_variant(results: Path, tmp_path: Path) -> None:
    """--lors-lr trains LORS at its own peak lr into ``bench_detr_dense-lr<v>_lors-lr<v>``: the dense figures must be
    the default run's, the LORS ones others."""
    lr_file = tmp_path / "RESULTS.md"
    _run("bench_detr.py", "--lors-lr", "3e-3", "--results-file", str(lr_file), "--data-dir", str(tmp_path / "data"))
    section = _section(lr_file, "bench_detr_dense-lr0.0003_lors-lr0.003")
    assert "at peak lr 0.0003 (dense) / 0.003 (lors)" in section
    default, faster_lors = _columns(_section(results, "bench_detr")), _columns(section)
    assert faster_lors["lors"]["peak lr"] == "0.003" and faster_lors["dense"]["peak lr"] == "0.0003"
    assert _figures(faster_lors["dense"]) == _figures(default["dense"])
    assert faster_lors["lors"]["final loss"] != default["lors"]["final loss"]


@pytest.mark.parametrize("flag", ["--lr", "--dense-lr", "--lors-lr"])
def test_detr_rejects_a_learning_rate_that_is_not_positive(flag: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_detr.py"), "--smoke", flag, "0",
                           "--results-file", str(tmp_path / "RESULTS.md")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "learning rates must be > 0" in proc.stderr, proc.stderr[-2000:]


def test_detr_one_variant_gives_its_figures_alone(results: Path, tmp_path: Path) -> None:
    """--variants dense trains only the dense model, with the figures it has in the run of both, into its own
    section."""
    dense_file = tmp_path / "RESULTS.md"
    _run("bench_detr.py", "--variants", "dense", "--results-file", str(dense_file), "--data-dir", str(tmp_path / "data"))
    assert "<!-- bench_detr:start -->" not in dense_file.read_text(encoding="utf-8")
    rows = _columns(_section(dense_file, "bench_detr_dense"))
    assert set(rows) == {"dense"}
    assert _figures(rows["dense"]) == _figures(_columns(_section(results, "bench_detr"))["dense"])


@pytest.mark.parametrize("script", ["bench_scratch.py", "bench_detr.py", "bench_speed.py", "bench_convert.py"])
@pytest.mark.parametrize("results_file", [None, "docs/RESULTS.md", "docs/smoke.md"])  # plots go to its folder
def test_a_smoke_run_refuses_to_write_over_the_real_results(script: str, results_file: str | None) -> None:
    """--smoke's tiny figures (and plots) must not replace the real runs' in docs/ (they did, exit status 0)."""
    before = {path: path.read_bytes() for path in (REPO / "docs").iterdir() if path.is_file()}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--smoke",
                           *(["--results-file", results_file] if results_file else [])], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--smoke writes to a scratch file: give --results-file" in proc.stderr
    assert {path: path.read_bytes() for path in (REPO / "docs").iterdir() if path.is_file()} == before


def test_scratch_setup_names_the_characters_each_split_is_scored_on(results: Path) -> None:
    """Validation is scored on a quarter of --eval-tokens (smoke: 512 // 4 = 128), test on all of them; the setup
    said 'the first 512 characters of each held-out split'."""
    section = _section(results, "bench_scratch")
    assert "over the first 512 characters of the test split and the first 128 of the validation split" in section
    assert "characters of each held-out split" not in section
