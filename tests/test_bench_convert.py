"""scripts/bench_convert.py --smoke: the whole pipeline on tiny models, writing its section and plot."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lors_hf.calibration import DEFAULT_DAMPING

DEFAULT = f"damping {DEFAULT_DAMPING:g}"  # how the results table names the library's default
OTHER_DAMPING = 0.5  # another damping: another conversion

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_convert.py"


@pytest.mark.slow
def test_smoke_run_writes_the_table_the_plot_and_the_command(tmp_path):
    results_file = tmp_path / "RESULTS.md"
    results_file.write_text("# results\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    scratch = tmp_path / "tmp"  # the script's temporary folders (the Trainers' output_dir) go here
    scratch.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(scratch)}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--results-file", str(results_file), "--reductions", "0.3", "0.5"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert [p.name for p in scratch.iterdir() if p.name.startswith("bench_convert_")] == []  # removed at the end
    text = results_file.read_text()
    assert "<!-- other:start -->\nkept\n<!-- other:end -->" in text  # other sections untouched
    section = text[text.index("<!-- bench_convert:start -->"):text.index("<!-- bench_convert:end -->")]
    assert "python scripts/bench_convert.py --smoke" in section
    assert "| model | target | stacks removed | rank | method | error after conversion | vs svd | convert s |" in section
    for model in ("MiniLM-L6", "SmolLM2-135M"):
        for method in ("svd", "alternating", f"data-aware (damping {DEFAULT_DAMPING:g})"):
            assert any(line.startswith(f"| {model} | 50% |") and f"| {method} |" in line for line in section.splitlines())
    assert "### After recovery" in section and "### Targets" in section
    assert (tmp_path / "bench_convert.png").stat().st_size > 1000
    raw = json.loads((tmp_path / "bench_convert.json").read_text())
    assert {row["reduction"] for row in raw["minilm"]["conversion"]} == {0.3, 0.5}
    assert all(row["error"] >= 0 for row in raw["minilm"]["conversion"])
    # the tiny SmolLM2's grouped-query keys and values (16 x 32) would grow as LORS at 30%: they stay dense
    smol_30 = [row for row in raw["smollm2"]["conversion"] if row["reduction"] == 0.3]
    assert smol_30 and all(row["kept_dense"] == ["k_proj", "v_proj"] for row in smol_30)
    assert any(line.startswith("| SmolLM2-135M | 30% |") and "; k_proj, v_proj dense |" in line
               for line in section.splitlines())
    # the report alone can be rebuilt from the saved figures
    rebuilt = tmp_path / "REBUILT.md"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--from-json", str(tmp_path / "bench_convert.json"), "--results-file",
         str(rebuilt), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert section.strip() in rebuilt.read_text()


def _smollm2_smoke(tmp_path: Path) -> tuple[Path, dict[str, str], list[str]]:
    """The results file, environment and base command of a SmolLM2 smoke run writing into `tmp_path`."""
    results_file = tmp_path / "RESULTS.md"
    return results_file, {**os.environ, "HF_HUB_OFFLINE": "1"}, [
        sys.executable, str(SCRIPT), "--smoke", "--model", "smollm2", "--results-file", str(results_file),
        "--reductions", "0.3", "0.5"]


@pytest.mark.slow
def test_recover_only_redoes_the_recovery_and_keeps_the_other_figures(tmp_path):
    results_file, env, base = _smollm2_smoke(tmp_path)
    completed = subprocess.run(base, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    first = json.loads((tmp_path / "bench_convert.json").read_text())["smollm2"]
    completed = subprocess.run(base + ["--merge", "--recover-only", "--recover-lr", "3e-4", "--recover-batch", "1"],
                               capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    second = json.loads((tmp_path / "bench_convert.json").read_text())["smollm2"]
    assert second["command"] == first["command"]  # the conversion figures keep their provenance
    # the same recipe with another batch and lr is a new row next to the earlier one, which stays as it was
    earlier_row, row = second["recovery"]
    assert earlier_row == first["recovery"][0] and "run" not in earlier_row
    assert "--recover-only" in row["run"]["command"]
    assert len(second["conversion"]) == len(first["conversion"]) == 6
    kept = [row for row in first["conversion"] if (row["reduction"], row["method"]) != (0.5, "data-aware")]
    assert all(row in second["conversion"] for row in kept)
    assert row["schedule"] == "cosine" and row["planned_steps"] == 2
    assert row["learning_rate"] == 3e-4 and row["batch"] == 1
    section = results_file.read_text()
    assert "--recover-only" in section and "SmolLM2 recovery" in section and "batch 1, lr 0.0003" in section
    assert "batch 2, lr 0.0002" in section  # both rows are in the table
    (redone,) = [r for r in second["conversion"] if "run" in r]  # the recovery run converted that model again
    assert (redone["reduction"], redone["method"]) == (0.5, "data-aware") and "this_run" not in redone
    assert redone["damping"] == DEFAULT_DAMPING  # the library's default, recorded
    assert f"| data-aware ({DEFAULT})<sup>1</sup> |" in section and "<sup>1</sup> converted again by `" in section
    # a recovery with the LM loss adds its rows and the dense reference, and keeps the distillation-only row
    completed = subprocess.run(base + ["--merge", "--recover-only", "--recover-lm-weight", "1"], capture_output=True,
                               text=True, timeout=300, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    third = json.loads((tmp_path / "bench_convert.json").read_text())["smollm2"]
    assert [(r["method"], r["recovery"]) for r in third["recovery"]] == [
        ("data-aware", "distill"), ("data-aware", "distill"), ("dense", "LM fine-tune"),
        ("data-aware", "distill + LM loss")]
    assert third["recovery"][:2] == second["recovery"] and third["recovery"][3]["lm_weight"] == 1.0
    section = results_file.read_text()
    assert "like for like" in section and "dense + LM fine-tune" in section
    commands = [line for line in section.splitlines() if line.startswith("Command:")]
    assert sum("--recover-only" in line for line in commands) == 2  # both recovery commands are named
    assert "from 256 calibration tokens" in section  # each LORS recovery names the calibration it started from
    # a full rerun with --merge redoes the conversions and its recipe, keeps the other rows, and keeps the
    # dense reference that trained the same recipe to the end instead of training it again
    completed = subprocess.run(base + ["--merge", "--recover-lm-weight", "1"], capture_output=True, text=True,
                               timeout=300, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "keeping the dense LM fine-tune" in completed.stdout
    fourth = json.loads((tmp_path / "bench_convert.json").read_text())["smollm2"]
    assert "--recover-only" not in fourth["command"] and len(fourth["conversion"]) == 6
    assert not any("run" in r for r in fourth["conversion"]) and "converted again" not in results_file.read_text()
    # distillation-only rows and dense reference as they were; the row that was the section's own now names
    # the run that made it
    assert fourth["recovery"][1:3] == third["recovery"][1:3]
    assert fourth["recovery"][0] == {**third["recovery"][0], "run": fourth["recovery"][0]["run"]}
    assert fourth["recovery"][0]["run"]["command"] == first["command"]
    assert fourth["recovery"][3]["recovery"] == "distill + LM loss" and "run" not in fourth["recovery"][3]
    # the LM loss alone on the converted model: the dense reference's recipe, next to it and kept like it
    completed = subprocess.run(base + ["--merge", "--recover-only", "--recover-lm-weight", "1", "--recover-no-distill"],
                               capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "keeping the dense LM fine-tune" in completed.stdout
    fifth = json.loads((tmp_path / "bench_convert.json").read_text())["smollm2"]
    (lm_alone,) = [r for r in fifth["recovery"] if r not in fourth["recovery"]]
    assert all(r in fifth["recovery"] for r in fourth["recovery"]) and len(fifth["recovery"]) == 5
    assert (lm_alone["method"], lm_alone["recovery"]) == ("data-aware", "LM fine-tune")
    assert "--recover-no-distill" in lm_alone["run"]["command"]
    section = results_file.read_text()
    assert "no teacher" in section and f"data-aware ({DEFAULT}) + LM fine-tune" in section
    # other settings: a new dense reference for them; the rows of the earlier settings (LM alone included) stay,
    # each with its own reference
    completed = subprocess.run(base + ["--merge", "--recover-only", "--recover-lm-weight", "1", "--recover-no-distill",
                                       "--recover-lr", "3e-4"], capture_output=True, text=True, timeout=300, env=env,
                               cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "keeping the dense LM fine-tune" not in completed.stdout
    sixth = json.loads((tmp_path / "bench_convert.json").read_text())["smollm2"]["recovery"]
    assert [(r["method"], r["recovery"], r["learning_rate"]) for r in sixth] == [
        ("data-aware", "distill", 2e-4), ("data-aware", "distill", 3e-4), ("data-aware", "distill + LM loss", 2e-4),
        ("dense", "LM fine-tune", 2e-4), ("data-aware", "LM fine-tune", 2e-4), ("dense", "LM fine-tune", 3e-4),
        ("data-aware", "LM fine-tune", 3e-4)]
    old_reference, new_reference = sixth[3]["ppl_after"], sixth[5]["ppl_after"]
    targets = results_file.read_text().split("### Targets")[1].splitlines()
    distilled = next(line for line in targets if "+ distill + LM loss (" in line)
    assert f"({old_reference})" in distilled
    for lr, reference in (("0.0002", old_reference), ("0.0003", new_reference)):
        (alone,) = [line for line in targets if f"data-aware ({DEFAULT}) + LM fine-tune (" in line and f"lr {lr})" in line]
        assert f"({reference})" in alone and "2 of 2 planned steps" in alone
    # distill + LM loss again: it redoes its own row, keeps the others, and keeps its dense reference as it was
    completed = subprocess.run(base + ["--merge", "--recover-only", "--recover-lm-weight", "1"], capture_output=True,
                               text=True, timeout=300, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    seventh = json.loads((tmp_path / "bench_convert.json").read_text())["smollm2"]["recovery"]
    assert [(r["method"], r["recovery"], r["learning_rate"]) for r in seventh] == [
        ("data-aware", "distill", 2e-4), ("data-aware", "distill", 3e-4), ("data-aware", "LM fine-tune", 2e-4),
        ("dense", "LM fine-tune", 3e-4), ("data-aware", "LM fine-tune", 3e-4), ("dense", "LM fine-tune", 2e-4),
        ("data-aware", "distill + LM loss", 2e-4)]
    assert seventh[:6] == [sixth[0], sixth[1], sixth[4], sixth[5], sixth[6], sixth[3]]
    # a full rerun that recovers nothing redoes the conversions and keeps every recovery row
    completed = subprocess.run(base + ["--merge", "--recover-minutes", "0"], capture_output=True, text=True,
                               timeout=300, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    eighth = json.loads((tmp_path / "bench_convert.json").read_text())["smollm2"]
    assert "--recover-minutes 0" in eighth["command"] and len(eighth["conversion"]) == 6
    assert [{k: v for k, v in r.items() if k != "run"} for r in eighth["recovery"]] == [
        {k: v for k, v in r.items() if k != "run"} for r in seventh]
    assert all("--recover-minutes 0" not in r["run"]["command"] for r in eighth["recovery"])
    # another damping is another conversion: its row and its recovery go next to the earlier ones, and the dense
    # reference (which has no conversion) is kept, not trained again
    completed = subprocess.run(base + ["--merge", "--recover-only", "--recover-lm-weight", "1", "--damping", str(OTHER_DAMPING)],
                               capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "keeping the dense LM fine-tune" in completed.stdout
    ninth = json.loads((tmp_path / "bench_convert.json").read_text())["smollm2"]
    assert all(row in ninth["conversion"] for row in eighth["conversion"]) and len(ninth["conversion"]) == 7
    (converted,) = [r for r in ninth["conversion"] if r not in eighth["conversion"]]
    assert (converted["reduction"], converted["method"], converted["damping"]) == (0.5, "data-aware", OTHER_DAMPING)
    assert all(row in ninth["recovery"] for row in eighth["recovery"]) and len(ninth["recovery"]) == 8
    reference, recovered = ninth["recovery"][-2:]  # the kept reference moves next to the row it serves
    assert reference == next(r for r in eighth["recovery"] if r["method"] == "dense" and r["learning_rate"] == 2e-4)
    assert (recovered["recovery"], recovered["damping"], recovered["ppl_before"]) == (
        "distill + LM loss", OTHER_DAMPING, converted["error"])
    section = results_file.read_text()
    assert f"| data-aware (damping {OTHER_DAMPING:g})<sup>1</sup> |" in section and f"| data-aware ({DEFAULT}) |" in section
    targets = section.split("### Targets")[1]
    assert f"data-aware (damping {OTHER_DAMPING:g}) + distill + LM loss (" in targets
    assert f"data-aware (damping {OTHER_DAMPING:g}) " in targets.split("SmolLM2 ppl at 50%: ")[2]  # both conversions' target lines


@pytest.mark.slow
def test_a_partial_rerun_redoes_only_the_rows_it_names_and_each_row_names_the_run_that_made_it(tmp_path):
    results_file, env, base = _smollm2_smoke(tmp_path)

    def run(*extra: str) -> tuple[str, dict]:
        completed = subprocess.run(base + list(extra), capture_output=True, text=True, timeout=300, env=env,
                                   cwd=tmp_path)
        assert completed.returncode == 0, completed.stderr[-3000:]
        return completed.stdout, json.loads((tmp_path / "bench_convert.json").read_text())["smollm2"]

    _, first = run("--recover-lm-weight", "1")  # every row is the section's own
    assert not any("run" in row for row in first["conversion"] + first["recovery"])
    # a recovery run of the same recipe keeps the section's dense reference as it was: not made by that run
    stdout, second = run("--merge", "--recover-only", "--recover-lm-weight", "1")
    assert "keeping the dense LM fine-tune" in stdout
    (reference,) = [row for row in second["recovery"] if row["method"] == "dense"]
    assert reference == next(row for row in first["recovery"] if row["method"] == "dense")
    (recovered,) = [row for row in second["recovery"] if row["method"] != "dense"]
    assert "--recover-only" in recovered["run"]["command"] and recovered["run"]["wall_minutes"] >= 0
    # conversions alone at one budget: the other rows and the section's provenance stay
    _, third = run("--merge", "--reductions", "0.3", "--methods", "data-aware", "--recover-minutes", "0")
    assert third["command"] == first["command"] and third["recovery"] == second["recovery"]
    assert len(third["conversion"]) == 6
    (added,) = [row for row in third["conversion"] if row not in second["conversion"]]
    assert (added["reduction"], added["method"]) == (0.3, "data-aware")
    assert "--recover-minutes 0" in added["run"]["command"] and added["run"]["wall_minutes"] >= 0
    lines = results_file.read_text().splitlines()
    assert any(line.startswith("| SmolLM2-135M | 50% |") and f"| data-aware ({DEFAULT})<sup>1</sup> |" in line for line in lines)
    assert any(line.startswith("| SmolLM2-135M | 30% |") and f"| data-aware ({DEFAULT})<sup>2</sup> |" in line for line in lines)
    (once,) = [line for line in lines if line.startswith("<sup>1</sup> converted again by `")]
    (twice,) = [line for line in lines if line.startswith("<sup>2</sup> converted again by `")]
    assert "--recover-only" in once and "--recover-minutes 0" in twice
    (conversions,) = [line for line in lines if line.startswith("Command:") and "--recover-minutes 0" in line]
    assert "SmolLM2 conversions" in conversions


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_convert", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_report_compares_functional_errors_and_names_a_recovery_from_an_earlier_conversion():
    bench = _load_script()
    dense_ppl = 40.0
    conversion = [{"reduction": 0.5, "method": method, "error": round(dense_ppl * math.exp(excess), 3), "rank": 8,
                   "stack_reduction": 0.5, "convert_s": 1.0} for method, excess in (("data-aware", 2.0), ("svd", 10.0))]
    recovery = [{"reduction": 0.5, "method": "data-aware", "recovery": "distill", "ppl_before": 1032.0,
                 "ppl_after": 60.0, "dense_ppl": dense_ppl, "steps": 10, "train_s": 60.0, "batch": 2,
                 "learning_rate": 2e-4, "planned_steps": 10, "calibration_tokens": 64}]
    results = {"meta": {"machine": "cpu", "threads": 2, "smoke": False, "date": "2026-11-29", "command": "c",
                        "sizes": {"smol_window": 512}},
               "smollm2": {"dense_ppl": dense_ppl, "conversion": conversion, "recovery": recovery}}
    lines = bench.markdown(results, "c", None).splitlines()
    svd, aware = (next(line for line in lines if line.startswith("| SmolLM2-135M | 50%") and f"| {m} |" in line)
                  for m in ("svd", "data-aware"))
    assert lines.index(svd) < lines.index(aware)  # rows in method order, whatever order the runs left them in
    assert "| 1.000 |" in svd and "| 0.200 |" in aware  # excess loss 2 nats against 10, not a perplexity ratio
    assert any("80.0% lower error" in line for line in lines)
    (recovered,) = [line for line in lines if "| distill (" in line]
    assert "ppl 1032.0 (an earlier run's conversion) -> 60.0" in recovered
    recovery[0]["ppl_before"] = conversion[0]["error"]  # recovered from the conversion in the table: no remark
    assert "earlier run's conversion" not in bench.markdown(results, "c", None)


def test_out_folder_gets_the_report_unless_a_results_file_is_named(tmp_path):
    """`--out DIR` without `--results-file` updated docs/RESULTS.md (with a plot link into DIR): the report now
    goes to DIR/RESULTS.md; `--out docs`, the documented runs, still updates docs/RESULTS.md."""
    bench = _load_script()
    assert Path(bench.parse_args(["--out", str(tmp_path)]).results_file) == tmp_path / "RESULTS.md"
    assert Path(bench.parse_args(["--out", "docs"]).results_file) == Path("docs") / "RESULTS.md"
    assert bench.parse_args(["--out", str(tmp_path), "--results-file", "r.md"]).results_file == "r.md"
    assert bench.parse_args([]).results_file is None  # main's default: docs/RESULTS.md


def test_smoke_refuses_to_write_docs_results(capsys):
    bench = _load_script()
    with pytest.raises(SystemExit):
        bench.parse_args(["--smoke"])
    assert "--results-file" in capsys.readouterr().err
    args = bench.parse_args(["--smoke", "--results-file", "r.md", "--reductions", "0.5"])
    assert args.reductions == [0.5] and args.methods == ["svd", "alternating", "data-aware"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--reductions", "1.5"])
    with pytest.raises(SystemExit):  # the LM loss alone needs the LM loss
        bench.parse_args(["--recover-no-distill"])
    assert "--recover-lm-weight" in capsys.readouterr().err


@pytest.mark.slow
def test_a_minilm_rerun_of_conversions_keeps_the_other_rows(tmp_path):
    """MiniLM with --merge and no fine-tuning redoes only the conversions it names (it used to drop every other
    MiniLM row, the fine-tuning ones included)."""
    results_file = tmp_path / "RESULTS.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, str(SCRIPT), "--smoke", "--model", "minilm", "--results-file", str(results_file)]

    def run(*extra: str) -> dict:
        completed = subprocess.run(base + list(extra), capture_output=True, text=True, timeout=300, env=env,
                                   cwd=tmp_path)
        assert completed.returncode == 0, completed.stderr[-3000:]
        return json.loads((tmp_path / "bench_convert.json").read_text())["minilm"]

    first = run("--reductions", "0.3", "0.5")
    assert len(first["conversion"]) == 6 and first["recovery"]
    second = run("--merge", "--reductions", "0.5", "--methods", "data-aware", "--recover-minutes", "0",
                 "--damping", str(OTHER_DAMPING))
    assert second["command"] == first["command"] and second["recovery"] == first["recovery"]
    assert all(row in second["conversion"] for row in first["conversion"]) and len(second["conversion"]) == 7
    (added,) = [row for row in second["conversion"] if row not in first["conversion"]]
    assert (added["reduction"], added["method"], added["damping"]) == (0.5, "data-aware", OTHER_DAMPING)
    assert "--recover-minutes 0" in added["run"]["command"]
    section = results_file.read_text()
    assert f"| data-aware (damping {OTHER_DAMPING:g})<sup>1</sup> |" in section and "### After recovery" in section
    # the same conversion again replaces its own row
    third = run("--merge", "--reductions", "0.5", "--methods", "data-aware", "--recover-minutes", "0",
                "--damping", str(OTHER_DAMPING))
    assert len(third["conversion"]) == 7 and third["recovery"] == first["recovery"]


@pytest.mark.slow
@pytest.mark.parametrize("failing, options", [
    ("convert", ["--merge", "--reductions", "0.5", "--methods", "data-aware", "--recover-minutes", "0"]),
    ("train", ["--merge"]),  # redoes the recovery rows, after converting again
    ("convert", []),  # a run without --merge replaces the whole JSON, but only once it has ended well
])
def test_a_smollm2_rerun_that_fails_leaves_the_earlier_figures_whole(tmp_path, monkeypatch, capsys, failing, options):
    """A run saves its figures as it goes in a progress file and replaces the JSON and the section only at its
    end, so a rerun that fails (or is stopped) loses none of the earlier figures, whatever it would redo."""
    import torch

    results_file, env, base = _smollm2_smoke(tmp_path)
    completed = subprocess.run(base, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    json_path, progress_path = tmp_path / "bench_convert.json", tmp_path / "bench_convert.partial.json"
    before, section_before = json_path.read_bytes(), results_file.read_text()
    first = json.loads(before)["smollm2"]
    assert first["recovery"] and not progress_path.exists()  # a run that ends well leaves no progress file
    module = _load_script()

    def interrupted(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(module, failing, interrupted)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            module.main(base[2:] + options)
    finally:
        torch.set_num_threads(threads)
    assert json_path.read_bytes() == before and results_file.read_text() == section_before
    assert str(progress_path) in capsys.readouterr().err
    progress = json.loads(progress_path.read_text())
    assert progress["meta"]["command"].endswith(" ".join(base[2:] + options))  # the failed run's own figures
    if failing == "train":  # it had converted again before failing
        assert len(progress["smollm2"]["conversion"]) == len(first["conversion"])
    elif options:  # a partial run keeps the rows it would redo until its own replace them
        assert progress["smollm2"]["conversion"] == first["conversion"]
