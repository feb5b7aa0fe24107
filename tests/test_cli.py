"""Tests of the ``lors-hf`` command line: convert, report, merge, demo, and its one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny_models import save_tiny_bert

import lors_hf
import lors_hf.assets
import lors_hf.cli
import lors_hf.training_args
from lors_hf.cli import main

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")  # the CI box is small and shared


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    """A tiny dense BERT classifier (random weights) with the real MiniLM tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("dense"), layers=4, max_positions=64)


def run_cli(*args: str) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code


def logits(model: torch.nn.Module, tokenizer_dir: Path) -> torch.Tensor:
    tokenizer = tf.AutoTokenizer.from_pretrained(tokenizer_dir)
    batch = tokenizer(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_convert_report_merge_roundtrip(dense_dir, tmp_path, capsys):
    lors_dir, merged_dir = tmp_path / "lors", tmp_path / "merged"
    assert run_cli("convert", dense_dir, lors_dir, "--rank", "3", "--init", "svd") == 0
    printed = capsys.readouterr()
    assert "whole model" in printed.out and f"LORS checkpoint written to {lors_dir}" in printed.out
    assert "convert: done" in printed.err  # the progress bar
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= {p.name for p in lors_dir.iterdir()}
    card = (lors_dir / "README.md").read_text()  # names the output folder, not the staging folder it was saved to
    assert f"# {lors_dir}\n" in card and f'from_pretrained("{lors_dir}")' in card and ".lors-saving-" not in card

    converted = tf.AutoModelForSequenceClassification.from_pretrained(lors_dir)
    assert lors_hf.is_lorsified(converted)
    assert {r for spec in converted.config.lors_config["rank"].values() for r in spec} == {3}
    # rank 3 of 32: the conversion is lossy, but it is the SVD split of the dense weights, not noise
    dense = tf.AutoModelForSequenceClassification.from_pretrained(dense_dir)
    reference = lors_hf.lorsify(tf.AutoModelForSequenceClassification.from_pretrained(dense_dir), rank=3, init="svd")
    assert torch.allclose(logits(converted, lors_dir), logits(reference, dense_dir), atol=1e-6)
    assert not torch.allclose(logits(converted, lors_dir), logits(dense, dense_dir), atol=1e-6)

    assert run_cli("report", lors_dir, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lors"] is True
    assert report == {"model": str(lors_dir), "lors": True, **lors_hf.parameter_report(converted).to_dict()}
    assert run_cli("report", lors_dir) == 0
    assert "bert.encoder.layer" in capsys.readouterr().out

    assert run_cli("merge", lors_dir, merged_dir) == 0
    assert "stock transformers loads it" in capsys.readouterr().out
    assert not lors_hf.is_lorsified(tf.AutoModelForSequenceClassification.from_pretrained(merged_dir))
    # Stock transformers, without lors_hf, loads the merged checkpoint and computes the LORS model's outputs.
    script = ("import sys, json, torch, transformers as tf\n"
              "assert 'lors_hf' not in sys.modules\n"
              "tok = tf.AutoTokenizer.from_pretrained(sys.argv[1])\n"
              "model = tf.AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()\n"
              "batch = tok(['a gripping, funny film', 'dull and far too long'], padding=True, return_tensors='pt')\n"
              "with torch.no_grad(): print(json.dumps(model(**batch).logits.tolist()))\n"
              "assert 'lors_hf' not in sys.modules\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(merged_dir)], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert torch.allclose(stock, logits(converted, lors_dir), atol=1e-5)


def test_convert_to_a_budget_with_calibration_data(dense_dir, tmp_path, capsys, monkeypatch):
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(lors_hf.assets.shakespeare_text().splitlines()[200:260]), encoding="utf-8")
    out = tmp_path / "budget"
    dampings = []  # the real lorsify, watched for the damping the command passes on

    def watched_lorsify(*args, calibration_damping=None, **kwargs):
        dampings.append(calibration_damping)
        return real_lorsify(*args, calibration_damping=calibration_damping, **kwargs)

    real_lorsify = lors_hf.surgery.lorsify
    monkeypatch.setattr(lors_hf.surgery, "lorsify", watched_lorsify)
    code = run_cli("convert", dense_dir, out, "--target-reduction", "0.4", "--init", "alternating",
                   "--calibration-file", calibration, "--calibration-samples", "40", "--max-length", "32",
                   "--calibration-damping", "0.05")
    assert code == 0 and dampings == [0.05]
    assert "data-aware on 40 samples" in capsys.readouterr().out
    assert run_cli("report", out, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stacks_total"]["reduction"] >= 0.4
    assert lors_hf.get_lors_config(tf.AutoModelForSequenceClassification.from_pretrained(out)).init == "alternating"


def test_bundled_model_names_work_as_in_the_scripts(capsys):
    """`lors-hf report bundled:minilm` looked the name up as a Hub id (offline: an error)."""
    assert run_cli("report", "bundled:minilm", "--json") == 0
    assert json.loads(capsys.readouterr().out)["stacks_total"]["dense"] == 10_646_784  # MiniLM's 6 layers
    assert run_cli("report", "bundled:nothing") == 1
    assert "unknown bundled model 'bundled:nothing'" in capsys.readouterr().err


def test_report_of_a_dense_checkpoint(dense_dir, capsys):
    assert run_cli("report", dense_dir, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lors"] is False
    assert report["stacks_total"]["lors"] == report["stacks_total"]["dense"] > 0
    assert report["model_total"]["lors"] == tf.AutoModelForSequenceClassification.from_pretrained(dense_dir).num_parameters()


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["convert", "{tmp}/missing", "{tmp}/out"], 1, "no such directory"),
        (["convert", "{dense}", "{tmp}/out", "--rank", "99"], 1, "rank 99 does not fit"),
        (["convert", "{dense}", "{tmp}/out", "--target-reduction", "1.5"], 1, "must lie in (0, 1)"),
        (["convert", "{dense}", "{tmp}/out", "--rank", "-1"], 2, "invalid rank -1"),
        (["convert", "{dense}", "{tmp}/out", "--rank", "4", "--target-reduction", "0.5"], 2, "not allowed with"),
        (["convert", "{dense}", "{tmp}/out", "--calibration-file", "{tmp}/none.txt"], 1, "no such file"),
        (["convert", "{dense}", "{tmp}/out", "--calibration-samples", "0"], 2, "invalid count 0"),
        (["convert", "{dense}", "{tmp}/out", "--calibration-damping", "-1"], 2, "invalid damping -1.0"),
        (["convert", "{dense}", "{tmp}/out", "--calibration-damping", "nan"], 2, "invalid damping nan"),
        (["convert", "{dense}", "{tmp}/out", "--calibration-damping", "0.1"], 1, "add --calibration-file"),
        (["convert", "{dense}", "{tmp}/out", "--calibration-samples", "3"], 1,  # both were ignored, status 0
         "--calibration-samples applies to data-aware conversion: add --calibration-file"),
        (["convert", "{dense}", "{tmp}/out", "--max-length", "7"], 1,
         "--max-length applies to data-aware conversion: add --calibration-file"),
        (["convert", "{dense}", "{tmp}/out", "--max-length", "-3"], 2, "invalid count -3"),
        (["convert", "{dense}", "{dense}"], 1, "must differ from the input"),
        (["merge", "{dense}", "{tmp}/out"], 1, "not a LORS checkpoint"),
        (["report", "{tmp}"], 1, "no config.json"),
        (["report", "no-such-org/no-such-model"], 1, "no local directory of that name, so it was looked up as a Hub id"),
        (["frobnicate"], 2, "invalid choice"),
        (["report", "{dense}/config.json"], 1, "config.json: a file, not a model directory"),  # "no such directory"
        (["convert", "{dense}", "{tmp}/out", "--calibration-file", "{dense}"], 1,
         "a directory, not a text file"),  # "no such file"
        (["demo", "--threads", "0"], 2, "invalid thread count 0"),  # status 1, unlike the other invalid numbers
    ],
)
def test_wrong_arguments_give_one_line(args, status, message, dense_dir, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, dense=dense_dir) for a in args]
    assert run_cli(*args) == status
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_calibration_input_that_would_mislead_the_conversion_gives_one_line(dense_dir, tmp_path, capsys):
    """A folder without tokenizer files would calibrate on unknown tokens only (transformers builds a near-empty
    tokenizer from config.json); a file that is not UTF-8 was a traceback."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(dense_dir / name, bare / name)
    text, latin1 = tmp_path / "text.txt", tmp_path / "latin1.txt"
    text.write_text("a gripping, funny film\n")
    latin1.write_bytes("un film très drôle\n".encode("latin-1"))
    for source, calibration, message in ((bare, text, "has no tokenizer files"), (dense_dir, latin1, "is not UTF-8")):
        assert run_cli("convert", source, tmp_path / "out", "--rank", "2", "--calibration-file", calibration) == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], lines
        assert not (tmp_path / "out").exists()


def test_converting_and_merging_into_an_earlier_output_replace_its_tokenizer_and_card(dense_dir, tmp_path, capsys,
                                                                                      monkeypatch):
    """The new checkpoint's tokenizer files replace an earlier model's (all of them, stale ones too), a README of
    the user's own stays, and a merge into an earlier LORS folder drops that folder's LORS model card."""
    out = tmp_path / "out"
    assert run_cli("convert", dense_dir, out, "--rank", "2") == 0
    assert "lors-hf" in (out / "README.md").read_text()  # the LORS model card
    (out / "vocab.txt").write_text("[PAD]\n[UNK]\nstale\n")  # an earlier model's tokenizer file
    (out / "tokenizer.json").write_text("{}")
    shutil.copytree(out, tmp_path / "old_lors")
    assert run_cli("convert", dense_dir, tmp_path / "lors2", "--rank", "2") == 0
    assert run_cli("merge", tmp_path / "lors2", tmp_path / "old_lors") == 0
    old = tmp_path / "old_lors"
    assert not (old / "README.md").exists()  # the LORS card does not describe a dense checkpoint
    assert (old / "tokenizer.json").read_bytes() == (dense_dir / "tokenizer.json").read_bytes()
    assert not (old / "vocab.txt").exists()
    assert tf.AutoModelForSequenceClassification.from_pretrained(old).config.to_dict().get("lors_config") is None

    (out / "README.md").write_text("# my own notes\n")
    assert run_cli("convert", dense_dir, out, "--rank", "3") == 0
    assert (out / "README.md").read_text() == "# my own notes\n"
    assert (out / "tokenizer.json").read_bytes() == (dense_dir / "tokenizer.json").read_bytes()
    assert not (out / "vocab.txt").exists()
    capsys.readouterr()
    monkeypatch.setenv("HOME", str(tmp_path))  # a quoted "~/..." (no shell expansion) names the local folder
    assert run_cli("report", "~/out", "--json") == 0
    assert json.loads(capsys.readouterr().out)["lors"] is True


def test_failed_merge_writes_nothing(dense_dir, tmp_path, capsys, monkeypatch):
    """A merge whose save fails (disk full) leaves no output folder behind, not a config without weights."""
    assert run_cli("convert", dense_dir, tmp_path / "lors", "--rank", "2") == 0

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tf.modeling_utils, "safe_save_file", disk_full)
    assert run_cli("merge", tmp_path / "lors", tmp_path / "out") == 1
    assert "No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_convert_refuses_a_lors_checkpoint(dense_dir, tmp_path, capsys):
    assert run_cli("convert", dense_dir, tmp_path / "once", "--rank", "2") == 0
    assert run_cli("convert", tmp_path / "once", tmp_path / "twice", "--rank", "2") == 1
    assert "already a LORS checkpoint" in capsys.readouterr().err


def test_console_script_and_module_entry_point(dense_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # the console script of the environment running the tests (a `lors-hf` on PATH may be another one's)
    script = Path(sys.executable).with_name("lors-hf")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "lors_hf"]
    proc = subprocess.run([*command, "report", str(dense_dir), "--json"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["lors"] is False
    proc = subprocess.run([sys.executable, "-m", "lors_hf", "merge", str(dense_dir), str(tmp_path / "x")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli("demo", "--quick", "--output-dir", out) == 0
    printed = capsys.readouterr().out
    assert "output fidelity" in printed and "accuracy after fine-tuning" in printed
    results = json.loads((out / "demo_results.json").read_text())
    assert results["parameters"]["stacks_total"]["reduction"] >= 0.5
    assert -1.0 <= results["fidelity"]["cosine_mean"] <= 1.0 and results["fidelity"]["max_abs_diff"] > 0
    assert all(0.0 <= results["accuracy"][k] <= 1.0 for k in ("dense", "lors"))
    assert results["runs"]["dense"]["loss_curve"] and results["runs"]["lors"]["loss_curve"]
    assert results["reload_max_abs_diff"] == 0.0
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = tf.AutoModelForSequenceClassification.from_pretrained(out / "lors-model")
    assert lors_hf.is_lorsified(model) and model.config.num_labels == 2
    assert not any(p.name.startswith(".trainer") for p in out.iterdir())


def test_convert_names_the_projections_it_keeps_dense(dense_dir, tmp_path, capsys):
    # at 5% fewer parameters the rank is 13, where the tiny BERT's 32 x 32 attention projections (4 layers)
    # would hold more as LORS (1,024 + 4 * 13 * 64) than dense (4 * 1,024): they stay dense
    out = tmp_path / "light"
    assert run_cli("convert", dense_dir, out, "--target-reduction", "0.05", "--init", "svd") == 0
    attention = [f"bert.encoder.layer.attention.{name}" for name in ("self.query", "self.key", "self.value",
                                                                      "output.dense")]
    assert (f"private ranks [13]; {', '.join(sorted(attention))} kept dense: LORS would not make them smaller"
            in capsys.readouterr().out)
    converted = tf.AutoModelForSequenceClassification.from_pretrained(out)
    assert sorted(lors_hf.get_lors_config(converted).dense_groups()) == sorted(attention)
    assert type(converted.bert.encoder.layer[1].attention.self.query) is torch.nn.Linear
    assert isinstance(converted.bert.encoder.layer[1].intermediate.dense, lors_hf.LorsLinear)
    assert lors_hf.parameter_report(converted).stacks_total.reduction >= 0.05


@pytest.mark.parametrize("command", ["convert", "merge", "report", "demo"])
def test_an_empty_path_is_refused_not_read_as_the_current_directory(command, dense_dir, tmp_path, capsys, monkeypatch):
    """`lors-hf convert model "$OUT"` with OUT unset wrote the checkpoint into the current directory (Path("") is
    "."), and an empty model path loaded whatever model the current directory held."""
    lors = tmp_path / "lors"
    assert run_cli("convert", dense_dir, lors, "--rank", "2") == 0
    work = tmp_path / "work"
    shutil.copytree(lors if command == "report" else dense_dir, work)  # a model in the current directory
    before = sorted(p.name for p in work.iterdir())
    monkeypatch.chdir(work)
    capsys.readouterr()
    calls = {"convert": [("convert", dense_dir, ""), ("convert", "", tmp_path / "out")],
             "merge": [("merge", lors, ""), ("merge", "", tmp_path / "out")],
             "report": [("report", "")], "demo": [("demo", "--quick", "--output-dir", "")]}[command]
    for args in calls:
        assert run_cli(*args) == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "is an empty path" in lines[0], lines
    assert sorted(p.name for p in work.iterdir()) == before and not (tmp_path / "out").exists()


def test_a_bundled_model_is_not_overwritten_by_its_own_conversion(dense_dir, tmp_path, capsys, monkeypatch):
    """The output was compared with the name `bundled:minilm`, not with the folder it names: converting into that
    folder overwrote the installed asset with a LORS checkpoint."""
    asset = shutil.copytree(dense_dir, tmp_path / "asset")
    monkeypatch.setattr(lors_hf.training_args, "resolve_model_path", lambda name: str(asset))
    before = {p.name: p.read_bytes() for p in asset.iterdir()}
    assert run_cli("convert", "bundled:minilm", asset, "--rank", "2") == 1
    assert "must differ from the input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in asset.iterdir()} == before


def test_calibration_samples_fit_the_models_positions(dense_dir, tmp_path, capsys):
    """The tiny BERT takes 64 tokens: a long line cut at the default 128 tokens (or at a --max-length past the
    model's limit) failed in the calibration run, with an error that blamed the calibration data's format."""
    calibration = tmp_path / "long.txt"
    calibration.write_text(" ".join(["word"] * 300) + "\nshort line\n", encoding="utf-8")
    assert run_cli("convert", dense_dir, tmp_path / "lors", "--rank", "2", "--calibration-file", calibration) == 0
    assert "data-aware on 2 samples" in capsys.readouterr().out
    assert run_cli("convert", dense_dir, tmp_path / "out", "--rank", "2", "--calibration-file", calibration,
                   "--max-length", "65") == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--max-length 65 exceeds the 64 tokens" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_ctrl_c_is_one_line_and_leaves_the_output_as_it_was(dense_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C ended with a KeyboardInterrupt traceback; it is one line, status 130, and the staged save leaves
    no output folder (a new one) or the earlier checkpoint (an existing one)."""
    assert run_cli("convert", dense_dir, tmp_path / "earlier", "--rank", "2") == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "earlier").iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tf.modeling_utils, "safe_save_file", interrupted)
    for out in (tmp_path / "new", tmp_path / "earlier"):
        capsys.readouterr()
        try:
            code = run_cli("convert", dense_dir, out, "--rank", "3")
        except KeyboardInterrupt:
            code = "KeyboardInterrupt"
        assert code == 130
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert lines == ["error: interrupted"]
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "earlier").iterdir()} == before


def test_an_output_that_cannot_be_written_is_refused_before_the_conversion(dense_dir, tmp_path, capsys, monkeypatch):
    """A read-only output folder, a path below a file, or a broken symbolic link failed only at the save, after
    the load and conversion (minutes for a large model), naming the hidden staging folder ("File exists")."""
    (tmp_path / "a-file").write_text("")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    (tmp_path / "dangling").symlink_to("nowhere")  # "File exists" at the save
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):  # a read-only file system (chmod does not stop root, which CI may be)
        if dir is not None and Path(dir).resolve() == read_only.resolve():
            raise OSError(30, "Read-only file system")
        return real_mkdtemp(*args, dir=dir, **kwargs)

    def load_model(path):
        raise AssertionError("loaded the model before checking the output")

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(lors_hf.cli, "load_model", load_model)
    unwritable = f"cannot write into {read_only} (Read-only file system)"
    for out, message in ((read_only, unwritable), (read_only / "sub", unwritable),
                         (tmp_path / "a-file" / "sub", f"{tmp_path / 'a-file'} is a file, not a directory"),
                         (tmp_path / "dangling", "is a symbolic link to nowhere, which does not exist")):
        capsys.readouterr()
        assert run_cli("convert", dense_dir, out, "--rank", "2") == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], lines
    assert list(read_only.iterdir()) == []


def test_calibration_with_a_tokenizer_that_has_no_token_to_pad_with(dense_dir, tmp_path, capsys):
    """A tokenizer without a padding, end-of-text or unknown token ended in a ValueError traceback ("Asking to pad
    but the tokenizer does not have a padding token"); each line is then a batch of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(dense_dir / name, model_dir / name)
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["the", "a", "film", "[X]"])}, unk_token="[X]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=words)
    assert tokenizer.pad_token is None and tokenizer.eos_token is None and tokenizer.unk_token is None
    tokenizer.save_pretrained(model_dir)
    calibration = tmp_path / "text.txt"
    calibration.write_text("the film\na film the film\nthe\n", encoding="utf-8")
    assert run_cli("convert", model_dir, tmp_path / "out", "--rank", "2", "--calibration-file", calibration) == 0
    assert "data-aware on 3 samples" in capsys.readouterr().out
