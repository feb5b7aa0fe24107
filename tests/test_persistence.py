"""Saving and reloading LORS models (issue "Save, reload and push to the Hub"; the Hub part is in
test_hub_push.py).

Fresh-process checks run in subprocesses, started together by one fixture: one process imports
lors_hf and reloads every family; the other cannot import lors_hf at all (a meta-path finder in a
``sitecustomize`` refuses it) and plays stock transformers: it must refuse the LORS checkpoints and
load the merged dense ones.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_models import FAMILIES, build, main_output

import lors_hf
from lors_hf import LorsConfig, is_lorsified, lorsify, merge_and_unload, parameter_report
from lors_hf.layer import LorsLinear
from lors_hf.persistence import GUARD_MESSAGE, GUARD_NOTICE_KEY, guard_key

TESTS_DIR = Path(__file__).resolve().parent
RANKS = [1, 2, 3]  # one per layer of the tiny models' stacks: a mix-up of layers changes shapes
AUTO_CLASSES = {
    "bert": "AutoModelForSequenceClassification",
    "gpt2": "AutoModelForCausalLM",
    "detr": "AutoModelForObjectDetection",
    "llama": "AutoModelForCausalLM",
    "vit": "AutoModelForImageClassification",
    "t5": "AutoModelForSeq2SeqLM",
    "whisper": "AutoModelForSpeechSeq2Seq",
}
STOCK_REFUSAL_FAMILIES = ("bert", "detr", "gpt2", "vit")

# --------------------------------------------------------------------------------------- helpers


@contextmanager
def one_thread():
    """Reference outputs are computed with one thread, like the subprocesses (same reduction order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def perturbed_lors_model(family: str, seed: int = 0, layers: int = 3, ranks=RANKS):
    """A lorsified tiny model whose every parameter is moved off its init (B != 0, biases != 0)."""
    model, inputs = build(family, seed=seed, layers=layers)
    lorsify(model, LorsConfig(rank=list(ranks)))
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model, inputs


def output(model, inputs) -> torch.Tensor:
    with torch.no_grad(), one_thread():
        return main_output(model(**inputs))


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The header of a .safetensors file (without ``__metadata__``) and the size of its data section."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    return header, len(raw) - 8 - length


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def staging_leftovers(folder: Path) -> list[str]:
    """The staging folders a save left behind (they live inside the checkpoint folder)."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".lors-saving-")] if folder.exists() else []


def load(folder: Path, family: str = "bert", **kwargs):
    return getattr(transformers, AUTO_CLASSES[family]).from_pretrained(folder, **kwargs).eval()


# ------------------------------------------------------------------------------ shared checkpoints


@pytest.fixture(scope="module")
def saved_families(tmp_path_factory) -> Path:
    """For every family: a LORS checkpoint, the merged dense checkpoint, inputs and reference outputs."""
    root = tmp_path_factory.mktemp("families")
    manifest = {}
    for family in FAMILIES:
        folder = root / family
        model, inputs = perturbed_lors_model(family)
        model.save_pretrained(folder / "lors")
        torch.save(inputs, folder / "inputs.pt")
        torch.save(output(model, inputs), folder / "lors_output.pt")
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, folder / "lors_state.pt")
        manifest[family] = {
            "auto": AUTO_CLASSES[family],
            "cls": type(model).__name__,
            "lors_layers": sum(isinstance(m, LorsLinear) for m in model.modules()),
            "lors_config": model.config.lors_config,
        }
        merge_and_unload(model).save_pretrained(folder / "dense")
        torch.save(output(model, inputs), folder / "merged_output.pt")
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, folder / "merged_state.pt")
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


RELOAD_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import lors_hf
import transformers
from lors_hf.layer import LorsLinear
from tiny_models import main_output

work = Path(sys.argv[1])
manifest = json.loads((work / "manifest.json").read_text())
results = {}
for family, info in manifest.items():
    folder = work / family
    inputs, reference = torch.load(folder / "inputs.pt"), torch.load(folder / "lors_output.pt")
    saved_state = torch.load(folder / "lors_state.pt")
    results[family] = {}
    for loader in (info["auto"], info["cls"]):
        model = getattr(transformers, loader).from_pretrained(folder / "lors").eval()
        state = model.state_dict()
        with torch.no_grad():
            out = main_output(model(**inputs))
        results[family][loader] = {
            "class": type(model).__name__,
            "weights_equal": set(state) == set(saved_state) and all(torch.equal(state[k], v)
                                                                   for k, v in saved_state.items()),
            "max_abs_diff": (out - reference).abs().max().item(),
            "scale": reference.abs().max().item(),
            "lors_layers": sum(isinstance(m, LorsLinear) for m in model.modules()),
            "lors_config": model.config.lors_config,
        }
print(json.dumps(results))
"""

STOCK_SCRIPT = r"""
import io, json, logging, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
try:
    import lors_hf
    import_error = None
except ImportError as err:
    import_error = str(err)
import transformers
from tiny_models import main_output

work, refusal_families = Path(sys.argv[1]), sys.argv[2].split(",")
manifest = json.loads((work / "manifest.json").read_text())
log = io.StringIO()
logging.getLogger("transformers").addHandler(logging.StreamHandler(log))
results = {"import_error": import_error}
for family, info in manifest.items():
    folder = work / family
    auto = getattr(transformers, info["auto"])
    entry = results[family] = {}
    if family in refusal_families:
        log.seek(0)
        log.truncate()
        try:
            auto.from_pretrained(folder / "lors")
            entry["refused"] = None
        except Exception as err:
            entry["refused"] = {"type": type(err).__name__, "message": str(err), "printed": log.getvalue()}
    inputs = torch.load(folder / "inputs.pt")
    model, info = auto.from_pretrained(folder / "dense", output_loading_info=True)
    with torch.no_grad():
        out = main_output(model.eval()(**inputs))
    merged, lors = torch.load(folder / "merged_output.pt"), torch.load(folder / "lors_output.pt")
    merged_state, state = torch.load(folder / "merged_state.pt"), model.state_dict()
    entry["dense"] = {
        "class": type(model).__name__,
        "has_lors_config": hasattr(model.config, "lors_config"),
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
        "weights_equal_to_merged": set(state) == set(merged_state) and all(torch.equal(state[k], v)
                                                                           for k, v in merged_state.items()),
        "max_abs_diff_to_merged": (out - merged).abs().max().item(),
        "max_abs_diff_to_lors": (out - lors).abs().max().item(),
        "lors_scale": lors.abs().max().item(),
    }
results["lors_hf_in_sys_modules"] = any(name.split(".")[0] == "lors_hf" for name in sys.modules)
print(json.dumps(results))
"""

BLOCK_LORS_HF = '''
import sys
import tempfile


class BlockLorsHf:
    """Meta-path finder that makes lors_hf unimportable: this process is stock transformers only."""

    def find_spec(self, name, path=None, target=None):
        if name == "lors_hf" or name.startswith("lors_hf."):
            raise ImportError("lors_hf is blocked in this process")
        return None


sys.meta_path.insert(0, BlockLorsHf())
'''


def _env(*paths: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="warning")
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def fresh_processes(saved_families, tmp_path_factory) -> dict[str, dict]:
    """Run the lors_hf reload process and the stock-transformers process side by side."""
    blocker = tmp_path_factory.mktemp("no_lors_hf")
    (blocker / "sitecustomize.py").write_text(BLOCK_LORS_HF)
    commands = {
        "lors_hf": ([sys.executable, "-c", RELOAD_SCRIPT, str(saved_families)], _env(TESTS_DIR)),
        "stock": ([sys.executable, "-c", STOCK_SCRIPT, str(saved_families), ",".join(STOCK_REFUSAL_FAMILIES)],
                  _env(blocker, TESTS_DIR)),
    }
    running = {name: subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, (cmd, env) in commands.items()}
    results = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=400)
        assert process.returncode == 0, f"{name} process failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
        results[name] = json.loads(stdout.strip().splitlines()[-1])
    return results


# ------------------------------------------------------------------------- 1. file size and layout


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_saved_file_holds_exactly_the_lors_parameters(family, tmp_path):
    model, _ = perturbed_lors_model(family)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["lors_config"] == model.config.lors_config
    assert LorsConfig.from_dict(config["lors_config"]).rank  # a valid, resolved plan

    header, data_bytes = safetensors_header(tmp_path / "model.safetensors")
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert data_bytes == state_bytes + len(GUARD_MESSAGE)  # + the guard; the notice tensor is empty
    assert max(end for entry in header.values() for end in entry["data_offsets"]) == data_bytes
    report = parameter_report(model)
    assert report.total.lors < 0.8 * report.total.dense
    assert abs(data_bytes - 4 * report.total.lors) <= 0.01 * 4 * report.total.lors


def test_state_dict_layout_is_stable(tmp_path):
    model, _ = perturbed_lors_model("bert", layers=4, ranks=[1, 2, 3, 4])
    model.save_pretrained(tmp_path)
    header, _ = safetensors_header(tmp_path / "model.safetensors")
    assert set(header) == set(model.state_dict()) | {guard_key(model), GUARD_NOTICE_KEY}

    query = "bert.encoder.layer.{}.attention.self.query"
    assert header["bert.encoder.lors_shared.layer.attention.self.query.weight"]["shape"] == [32, 32]
    assert header["bert.encoder.lors_shared.layer.intermediate.dense.weight"]["shape"] == [64, 32]
    assert header[query.format(3) + ".lors_A"]["shape"] == [4, 32]
    assert header[query.format(3) + ".lors_B"]["shape"] == [32, 4]
    assert header[query.format(0) + ".lors_A"]["shape"] == [1, 32]
    assert header[query.format(2) + ".bias"]["shape"] == [32]
    assert all(header[query.format(i) + ".lors_A"]["dtype"] == "F32" for i in range(4))
    assert not any(query.format(i) + ".weight" in header for i in range(1, 4))  # no dense weights

    guard = query.format(0) + ".weight"  # the guard: a dense weight name, an impossible shape
    assert guard_key(model) == guard
    assert header[guard]["dtype"] == "U8" and header[guard]["shape"] == [len(GUARD_MESSAGE)]
    assert load_file(tmp_path / "model.safetensors")[guard].numpy().tobytes() == GUARD_MESSAGE
    assert header[GUARD_NOTICE_KEY]["shape"] == [0] and "lors_hf" in GUARD_NOTICE_KEY


def test_strict_load_state_dict_of_a_checkpoint_file(tmp_path):
    model, inputs = perturbed_lors_model("bert")
    model.save_pretrained(tmp_path)
    other, _ = perturbed_lors_model("bert", seed=1)
    assert not torch.equal(output(other, inputs), output(model, inputs))
    result = other.load_state_dict(load_file(tmp_path / "model.safetensors"))  # strict: guards dropped
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(output(other, inputs), output(model, inputs))


@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_of_lors_weights_into_dense_layers_says_lorsify_first(strict):
    """A LORS state dict loaded into a model without LORS layers (from_config of the LORS config, or the dense
    model): strict loading only listed missing and unexpected keys, and strict=False left every converted
    projection randomly initialised without a word. The error names the fix, which then loads exactly."""
    model, inputs = perturbed_lors_model("gpt2")
    state_dict = model.state_dict()
    fresh = transformers.AutoModelForCausalLM.from_config(model.config)  # dense layers, lors_config kept
    before = {name: p.clone() for name, p in fresh.named_parameters()}
    with pytest.raises(ValueError, match=r"LORS weights .* dense layers.*lorsify\(model, lors_hf.get_lors_config"):
        fresh.load_state_dict(state_dict, strict=strict)
    assert all(torch.equal(p, before[name]) for name, p in fresh.named_parameters())  # nothing half-loaded
    dense, _ = build("gpt2")
    with pytest.raises(ValueError, match="LorsConfig it was converted with"):
        dense.load_state_dict(state_dict, strict=strict)
    lorsify(fresh, lors_hf.get_lors_config(fresh))
    assert not fresh.load_state_dict(state_dict, strict=strict).missing_keys
    assert torch.equal(output(fresh.eval(), inputs), output(model, inputs))


def test_positional_save_arguments_keep_the_lors_layout(tmp_path):
    model, _ = perturbed_lors_model("vit")
    model.save_pretrained(tmp_path, True)  # is_main_process passed positionally
    header, _ = safetensors_header(tmp_path / "model.safetensors")
    assert set(header) == set(model.state_dict()) | {guard_key(model), GUARD_NOTICE_KEY}


@pytest.mark.parametrize("box_refine", [False, True])
def test_deformable_detr_keeps_its_tied_box_heads_dense_and_reloads(box_refine, tmp_path):
    """Deformable DETR ties its per-layer box heads to one another (or, with box refinement, to the decoder's
    copies): they stay tied and dense. lorsify converted the two copies apart (more parameters, a broken tie)
    and the checkpoint did not load (the heads are tied only after loading, so they looked like a new group)."""
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                         out_features=["stage2", "stage3", "stage4"])
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, d_model=32,
        encoder_layers=2, decoder_layers=3, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, with_box_refine=box_refine, num_labels=5)
    model = transformers.DeformableDetrForObjectDetection(config).eval()
    dense_parameters = model.num_parameters()
    inputs = {"pixel_values": torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))}
    lorsify(model, LorsConfig(rank=2, init="svd"))
    assert parameter_report(model).total.dense == dense_parameters  # no head counted (or converted) twice
    model.save_pretrained(tmp_path)
    reloaded = transformers.DeformableDetrForObjectDetection.from_pretrained(tmp_path).eval()
    assert is_lorsified(reloaded) and reloaded.num_parameters() == model.num_parameters()
    for checked in (model, reloaded):
        tied_to = checked.model.decoder.bbox_embed[1] if box_refine else checked.bbox_embed[0]
        assert [id(p) for p in checked.bbox_embed[1].parameters()] == [id(p) for p in tied_to.parameters()]
    if isinstance(model.bbox_embed[1].layers[0], LorsLinear):  # transformers 5.17: one ModuleList, two names
        assert model.model.decoder.bbox_embed is model.bbox_embed
    torch.testing.assert_close(output(reloaded, inputs), output(model, inputs))


# ---------------------------------------------------------------------- 2. reload in a fresh process


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_process_reload_restores_every_weight_bit_for_bit(family, fresh_processes, saved_families):
    info = json.loads((saved_families / "manifest.json").read_text())[family]
    loaded = fresh_processes["lors_hf"][family]
    assert set(loaded) == {info["auto"], info["cls"]}
    for loader, result in loaded.items():
        assert result["class"] == info["cls"], loader
        assert result["lors_layers"] == info["lors_layers"] > 0, loader
        assert result["lors_config"] == info["lors_config"], loader
        assert result["weights_equal"], loader  # every tensor, bit for bit
        # Outputs to float rounding: the reloaded tensors live where the safetensors file put them, and on
        # some CPUs (AVX2 here) kernels round differently on memory of another alignment (ViT, Whisper:
        # 6e-8 and 1.2e-7 apart; equal once the same weights are copied to fresh memory).
        assert result["max_abs_diff"] <= 1e-6 * max(1.0, result["scale"]), (loader, result["max_abs_diff"])


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_load_in_bfloat16(family, saved_families):
    folder = saved_families / family
    model = load(folder / "lors", family, dtype=torch.bfloat16)
    assert is_lorsified(model)
    saved = load_file(folder / "lors" / "model.safetensors")
    state = model.state_dict()
    lors_keys = [k for k in state if k.endswith(("lors_A", "lors_B")) or ".lors_shared." in k]
    assert lors_keys and all(state[k].dtype == torch.bfloat16 for k in lors_keys)
    assert all(torch.equal(state[k], saved[k].to(torch.bfloat16)) for k in lors_keys)
    inputs, reference = torch.load(folder / "inputs.pt"), torch.load(folder / "lors_output.pt")
    out = output(model, inputs).float()
    assert torch.isfinite(out).all()
    assert (out - reference).abs().max() <= 0.02 * reference.abs().max() + 0.01  # bf16 rounding only


# ------------------------------------------------------------- 3 and 6. stock transformers, no lors_hf


@pytest.mark.slow
def test_stock_process_cannot_import_lors_hf(fresh_processes):
    stock = fresh_processes["stock"]
    assert stock["import_error"] and "blocked" in stock["import_error"]
    assert not stock["lors_hf_in_sys_modules"]


@pytest.mark.slow
@pytest.mark.parametrize("family", STOCK_REFUSAL_FAMILIES)
def test_stock_transformers_refuses_a_lors_checkpoint(family, fresh_processes):
    refused = fresh_processes["stock"][family]["refused"]
    assert refused is not None, "stock transformers loaded a LORS checkpoint without lors_hf"
    assert refused["type"] == "RuntimeError" and "mismatch" in refused["message"]
    # transformers' exception text is its own; the load report it prints just before names lors_hf.
    assert GUARD_NOTICE_KEY in refused["printed"] and "MISMATCH" in refused["printed"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_checkpoint_loads_in_stock_transformers(family, fresh_processes, saved_families):
    dense = fresh_processes["stock"][family]["dense"]
    assert dense["class"] == json.loads((saved_families / "manifest.json").read_text())[family]["cls"]
    assert not dense["has_lors_config"]
    assert dense["loading_info"]["missing_keys"] == [] and dense["loading_info"]["mismatched_keys"] == []
    assert dense["loading_info"]["unexpected_keys"] == []
    assert dense["weights_equal_to_merged"]  # bit for bit; outputs to float rounding (see the test above)
    assert dense["max_abs_diff_to_merged"] <= 1e-6 * max(1.0, dense["lors_scale"])
    assert dense["max_abs_diff_to_lors"] <= 1e-5 * max(1.0, dense["lors_scale"])


# ------------------------------------------------------------------------- 4. Trainer checkpoints


def _training_examples(family: str, count: int = 4) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(count):
        if family == "bert":
            example = {"input_ids": torch.randint(0, 99, (12,), generator=generator),
                       "labels": torch.randint(0, 2, (), generator=generator)}
        elif family == "vit":
            example = {"pixel_values": torch.randn(3, 16, 16, generator=generator),
                       "labels": torch.randint(0, 3, (), generator=generator)}
        else:  # detr
            example = {"pixel_values": torch.randn(3, 64, 64, generator=generator),
                       "labels": {"class_labels": torch.randint(0, 3, (2,), generator=generator),
                                  "boxes": 0.25 + 0.5 * torch.rand(2, 4, generator=generator)}}
        examples.append(example)
    return examples


def _collate(examples: list[dict]) -> dict:
    batch = {k: torch.stack([e[k] for e in examples]) for k in examples[0] if k != "labels"}
    labels = [e["labels"] for e in examples]
    batch["labels"] = labels if isinstance(labels[0], dict) else torch.stack(labels)
    return batch


@contextmanager
def captured_transformers_warnings():
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["detr", "vit", "bert"])
def test_trainer_checkpoint_resume_restores_every_lors_weight(family, tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, save_strategy="steps", save_steps=2,
        per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True,
        logging_strategy="no", dataloader_num_workers=0, seed=0,
    )
    model, _ = perturbed_lors_model(family)
    model.train()
    Trainer(model=model, args=args, train_dataset=_training_examples(family), data_collator=_collate).train()

    checkpoint = tmp_path / "run" / "checkpoint-2"
    saved = load_file(checkpoint / "model.safetensors")
    assert set(saved) == set(model.state_dict()) | {guard_key(model), GUARD_NOTICE_KEY}  # native names
    assert json.loads((checkpoint / "config.json").read_text())["lors_config"] == model.config.lors_config
    assert staging_leftovers(checkpoint) == []

    fresh, _ = perturbed_lors_model(family, seed=1)
    lors_keys = [k for k in fresh.state_dict() if k.endswith(("lors_A", "lors_B")) or ".lors_shared." in k]
    assert not all(torch.equal(fresh.state_dict()[k], saved[k]) for k in lors_keys)
    fresh.train()
    resumed = Trainer(model=fresh, args=args, train_dataset=_training_examples(family), data_collator=_collate)
    with captured_transformers_warnings() as warnings:
        resumed.train(resume_from_checkpoint=str(checkpoint))
    state = fresh.state_dict()
    assert set(state) | {guard_key(fresh), GUARD_NOTICE_KEY} == set(saved)
    different = [k for k in state if not torch.equal(state[k], saved[k])]
    assert different == []
    assert not [w for w in warnings if "missing keys" in w or "unexpected keys" in w], warnings


# ------------------------------------------------------------------------ 7. bad and damaged input


def _edit_lors_config(edit):
    def mutate(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        edit(config["lors_config"])
        (folder / "config.json").write_text(json.dumps(config))
    return mutate


def _rewrite_bytes(edit):
    def mutate(folder: Path) -> None:
        path = folder / "model.safetensors"
        path.write_bytes(edit(bytearray(path.read_bytes())))
    return mutate


def _first_group(lors_config: dict) -> str:
    return sorted(lors_config["rank"])[0]


def _drop_tensor(folder: Path) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    del tensors["bert.encoder.layer.1.attention.self.key.lors_A"]
    save_file(tensors, path, metadata={"format": "pt"})


def _set(buffer: bytearray, start: int, data: bytes) -> bytearray:
    buffer[start : start + len(data)] = data
    return buffer


DAMAGE = {
    "truncated_weights": (_rewrite_bytes(lambda b: b[: len(b) * 2 // 3]), "truncated or corrupted"),
    "header_not_utf8": (_rewrite_bytes(lambda b: _set(b, 20, b"\xff" * 8)), "truncated or corrupted"),
    "header_not_json": (_rewrite_bytes(lambda b: _set(b, 8, b"[")), "truncated or corrupted"),
    "header_length_too_large": (_rewrite_bytes(lambda b: _set(b, 0, struct.pack("<Q", 1 << 40))),
                                "truncated or corrupted"),
    "ranks_edited": (_edit_lors_config(lambda c: c["rank"].update({_first_group(c): [2, 3, 4]})),
                     "do not match its lors_config"),
    "rank_list_of_wrong_length": (_edit_lors_config(lambda c: c["rank"].update({_first_group(c): [1, 2]})),
                                  "does not fit"),
    "target_modules_edited": (_edit_lors_config(lambda c: c.update(target_modules=["query"])), "leaves dense"),
    "lors_weight_missing": (_drop_tensor, "lacks 1 LORS weights"),
    "unknown_field_from_newer_version": (_edit_lors_config(lambda c: c.update(sparsity_mask=True)), "upgrade"),
    "newer_format_version": (_edit_lors_config(lambda c: c.update(format_version=99)), "upgrade"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_a_clear_error(damage, saved_families, tmp_path):
    mutate, message = DAMAGE[damage]
    folder = tmp_path / "ckpt"
    shutil.copytree(saved_families / "bert" / "lors", folder)
    mutate(folder)
    before = file_bytes(folder)
    with pytest.raises(ValueError, match=message):
        load(folder)
    assert file_bytes(folder) == before  # a failed load touches nothing


def _fail_half_way_through_writing(tensors, filename, metadata=None):
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    Path(filename).write_bytes(data[: len(data) // 2])
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failure", ["weights_write", "config_not_serialisable"])
def test_failed_save_keeps_the_previous_checkpoint(failure, monkeypatch, tmp_path):
    folder = tmp_path / "ckpt"
    model, inputs = perturbed_lors_model("bert")
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    before, expected = file_bytes(folder), output(model, inputs)

    newer, _ = perturbed_lors_model("bert", seed=1)
    if failure == "weights_write":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _fail_half_way_through_writing)
        error = OSError
    else:
        newer.config.not_serialisable = object()
        error = TypeError
    with pytest.raises(error):
        newer.save_pretrained(folder)

    assert file_bytes(folder) == before
    assert staging_leftovers(folder) == []
    assert torch.equal(output(load(folder), inputs), expected)


def test_a_failed_save_into_a_new_folder_leaves_no_folder(monkeypatch, tmp_path):
    folder = tmp_path / "new" / "ckpt"
    model, _ = perturbed_lors_model("bert")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _fail_half_way_through_writing)
    with pytest.raises(OSError):
        model.save_pretrained(folder)
    assert not folder.exists()


def test_save_into_a_folder_on_another_file_system_than_its_parent(tmp_path):
    """A mounted output folder (a container's volume) lives on another file system than the folder holding it:
    the staged files must still move in (staging beside the target failed with EXDEV)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the temporary folder")
    elsewhere = Path(tempfile.mkdtemp(dir=shm))
    try:
        folder = tmp_path / "mounted"
        folder.symlink_to(elsewhere, target_is_directory=True)
        model, inputs = perturbed_lors_model("bert")
        model.save_pretrained(folder)
        assert {"config.json", "model.safetensors"} <= {p.name for p in elsewhere.iterdir()}
        assert staging_leftovers(folder) == []
        assert torch.equal(output(load(folder), inputs), output(model, inputs))
    finally:
        shutil.rmtree(elsewhere)


def test_a_sub_model_of_a_composite_lors_checkpoint_is_refused_by_name(tmp_path):
    """CLIPVisionModel from a LORS CLIPModel checkpoint: the plan is on the composite config, so the vision
    projections came back randomly initialised with only a MISSING line in the load report (outputs 2.4 off)."""
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2), projection_dim=16)
    torch.manual_seed(0)
    clip = lorsify(transformers.CLIPModel(config).eval(), LorsConfig(rank="full", init="svd"))
    clip.save_pretrained(tmp_path)
    for part in (transformers.CLIPVisionModel, transformers.CLIPTextModel):
        with pytest.raises(ValueError, match=r"holds LORS weights, but the config it was given has no lors_config.*"
                                             r"CLIPModel.from_pretrained\(path\).vision_model"):
            part.from_pretrained(tmp_path)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(whole.vision_model(pixel_values=pixels).pooler_output,
                           clip.vision_model(pixel_values=pixels).pooler_output)
    # the same checkpoint as a .bin (no safetensors header to read first): refused once loaded
    weights = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(weights, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="holds LORS weights, but the config it was given has no lors_config"):
        transformers.CLIPVisionModel.from_pretrained(tmp_path)


KILLED_MID_SAVE = """
import os, signal, sys
import transformers
from tiny_models import build
from lors_hf import lorsify

def write_half_and_die(tensors, path, *args, **kwargs):
    with open(path, "wb") as handle:
        handle.write(b"half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)

model, _ = build("bert", seed=0, layers=3)
lorsify(model, rank=2)
transformers.modeling_utils.safe_save_file = write_half_and_die
model.save_pretrained(sys.argv[1])
"""


def test_a_save_removes_the_staging_folder_of_a_save_killed_mid_way(tmp_path):
    """A save killed mid-way (out of memory, a preempted job) left its half-written staging folder, a whole
    checkpoint's size, inside the target for good, and `push_output_dir` uploaded it. The next save removes it;
    staging folders of live processes and of other machines stay."""
    folder = tmp_path / "ckpt"
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(folder)], cwd=Path(__file__).parent,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)}, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    abandoned = staging_leftovers(folder)
    assert len(abandoned) == 1 and (folder / abandoned[0] / "model.safetensors").is_file()
    own = lors_hf.persistence._own_staging_prefix()
    assert abandoned[0].startswith(own)
    live = folder / f"{own}{os.getppid()}-live"
    elsewhere = folder / f".lors-saving-{socket.gethostname()}x-0-1-other"  # another host
    other_namespace = folder / f"{own[:-1]}9-1-other"  # another container of the same host name
    for kept in (live, elsewhere, other_namespace):
        kept.mkdir()
    model, inputs = perturbed_lors_model("bert")
    model.save_pretrained(folder)
    assert sorted(staging_leftovers(folder)) == sorted([live.name, elsewhere.name, other_namespace.name])
    assert torch.equal(output(load(folder), inputs), output(model, inputs))


def test_save_into_an_existing_folder(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    others = {"vocab.txt": b"[PAD]\n[UNK]\nhello\n", "tokenizer_config.json": b'{"do_lower_case": true}',
              "README.md": b"# my own card\n", "model.fp16.safetensors": b"another variant"}
    for name, data in others.items():
        (folder / name).write_bytes(data)

    first, inputs = perturbed_lors_model("bert")
    first.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists()
    second, _ = perturbed_lors_model("bert", seed=1)
    second.save_pretrained(folder)  # sharded -> single file: the old shards and index must go
    names = {p.name for p in folder.iterdir()}
    assert names == set(others) | {"config.json", "model.safetensors"}
    assert torch.equal(output(load(folder), inputs), output(second, inputs))

    first.save_pretrained(folder, max_shard_size="20KB")  # single -> sharded: the single file must go
    assert "model.safetensors" not in {p.name for p in folder.iterdir()}
    assert torch.equal(output(load(folder), inputs), output(first, inputs))
    assert {name: (folder / name).read_bytes() for name in others} == others
    assert staging_leftovers(folder) == []


def test_merged_model_saved_sharded_over_its_lors_checkpoint_replaces_it(tmp_path):
    """The dense save of merge_and_unload's model into the LORS checkpoint's folder: stock save_pretrained
    removes only stale shards, so the LORS model.safetensors stayed next to the dense shards, loaded first and
    made the folder unloadable (with or without lors_hf)."""
    model, inputs = perturbed_lors_model("gpt2")
    model.save_pretrained(tmp_path)
    merged = merge_and_unload(model)
    merged.save_pretrained(tmp_path, max_shard_size="20KB")
    assert "model.safetensors" not in {p.name for p in tmp_path.iterdir()}
    assert not (tmp_path / "README.md").exists()  # the LORS model card went with the LORS weights
    reloaded = load(tmp_path, "gpt2")
    assert not is_lorsified(reloaded)
    assert torch.equal(output(reloaded, inputs), output(merged.eval(), inputs))
    assert staging_leftovers(tmp_path) == []


def test_gpt2_with_rank_zero_layers_reloads_bit_for_bit(tmp_path):
    """GPT-2's _init_weights re-initialises ``c_proj.weight`` of every block when from_pretrained finishes; a
    rank-0 layer's weight must not be the shared weight, or the reload silently randomises it."""
    model, inputs = build("gpt2")
    lorsify(model, LorsConfig(rank=[0, 2, 0], init="svd"))
    model.save_pretrained(tmp_path)
    reloaded = load(tmp_path, "gpt2")
    state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert [k for k in state if not torch.equal(state[k], reloaded_state[k])] == []
    assert torch.equal(output(reloaded, inputs), output(model.eval(), inputs))


def test_writing_a_model_card_keeps_a_readme_of_the_users_own_unless_told_to_overwrite(tmp_path):
    model = lorsify(build("bert")[0], rank=2)
    (tmp_path / "README.md").write_text("# my own notes\n")
    with pytest.raises(ValueError, match=r"is not a LORS model card .* overwrite=True"):
        lors_hf.write_model_card(model, tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own notes\n"
    lors_hf.write_model_card(model, tmp_path, overwrite=True)
    assert "LORS" in (tmp_path / "README.md").read_text()
    lors_hf.write_model_card(model, tmp_path, repo_id="me/model")  # a LORS card of its own: replaced freely
    assert 'from_pretrained("me/model")' in (tmp_path / "README.md").read_text()


def test_a_model_card_the_user_edited_is_kept_by_later_saves(tmp_path):
    """An edited card kept its ``lors-hf`` tag, so the next save_pretrained replaced it and the edits were lost."""
    model = lorsify(build("bert")[0], rank=2)
    model.save_pretrained(tmp_path)
    card = tmp_path / "README.md"
    written = card.read_text()
    model.save_pretrained(tmp_path)  # an unedited card is lors-hf's: rewritten (the same text here)
    assert card.read_text() == written
    edited = written.replace("## Parameters", "## Training data\n\nRotten Tomatoes.\n\n## Parameters")
    card.write_text(edited)
    model.save_pretrained(tmp_path)
    assert card.read_text() == edited
    with pytest.raises(ValueError, match="a card you edited"):
        lors_hf.write_model_card(model, tmp_path)
    assert card.read_text() == edited
    card.write_text(written.replace("- low-rank\n", ""))  # an edit in the metadata counts too
    model.save_pretrained(tmp_path)
    assert card.read_text() == written.replace("- low-rank\n", "")


def test_model_card_of_a_dense_model_is_refused_with_a_clear_error(tmp_path):
    model, _ = build("bert")
    with pytest.raises(ValueError, match="not a LORS model"):
        lors_hf.write_model_card(model, tmp_path)
    merged = merge_and_unload(lorsify(build("bert")[0], rank=2))
    with pytest.raises(ValueError, match="not a LORS model"):
        lors_hf.write_model_card(merged, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_model_card_of_a_wrapper_is_a_type_error_and_a_new_folder_is_created(tmp_path):
    """A wrapper (no config of its own) got an AttributeError at ``model.config``; a folder not made yet got
    FileNotFoundError (save_pretrained creates its folder)."""
    model = lorsify(build("bert")[0], rank=2)
    wrapper = torch.nn.Sequential(model)
    with pytest.raises(TypeError, match=r"write_model_card takes the transformers model.*Sequential"):
        lors_hf.write_model_card(wrapper, tmp_path)
    card = lors_hf.write_model_card(model, tmp_path / "new" / "folder")
    assert card == tmp_path / "new" / "folder" / "README.md" and "LORS" in card.read_text()


# ------------------------------------------------------------------------- another class, from_config


@pytest.mark.parametrize(("saved_class", "loaded_class", "base"), [
    ("BertModel", "BertForSequenceClassification", "bert"),
    ("BertForSequenceClassification", "BertModel", "bert"),
    ("GPT2LMHeadModel", "GPT2Model", "transformer"),
    ("GPT2Model", "GPT2LMHeadModel", "transformer"),
])
def test_checkpoint_reloads_into_the_bare_model_or_one_with_a_head(saved_class, loaded_class, base, tmp_path):
    """transformers loads a bare model's weights into a model with a head and back; a LORS checkpoint too, even
    when it excluded its head by name (a name the bare model does not have)."""
    family = "bert" if base == "bert" else "gpt2"
    tiny, inputs = build(family)
    model = getattr(transformers, saved_class)(tiny.config).eval()
    head = {"BertForSequenceClassification": ["classifier"], "GPT2LMHeadModel": ["lm_head"]}.get(saved_class)
    lorsify(model, LorsConfig(rank=list(RANKS), init="svd", exclude_modules=head))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = getattr(transformers, loaded_class).from_pretrained(tmp_path / "ckpt").eval()
    assert is_lorsified(loaded)
    bare = [m if not hasattr(m, base) else getattr(m, base) for m in (model, loaded)]
    with torch.no_grad(), one_thread():
        expected, got = (m(input_ids=inputs["input_ids"]).last_hidden_state for m in bare)
    assert torch.equal(got, expected)
    ranks = [m.lors_A.shape[0] for m in bare[1].modules() if isinstance(m, LorsLinear)]
    assert sorted(set(ranks)) == RANKS


def test_model_built_from_a_lors_config_refuses_to_save_with_dense_layers(tmp_path):
    model, _ = perturbed_lors_model("bert")
    model.save_pretrained(tmp_path / "ckpt")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "ckpt")
    dense = transformers.AutoModelForSequenceClassification.from_config(config)  # dense layers, lors_config kept
    assert not is_lorsified(dense)
    with pytest.raises(ValueError, match="has a lors_config but dense layers"):
        dense.save_pretrained(tmp_path / "dense")
    assert not (tmp_path / "dense").exists()
    lorsify(dense, lors_hf.get_lors_config(dense))  # what the message says: the same LORS structure
    assert sorted({m.lors_A.shape[0] for m in dense.modules() if isinstance(m, LorsLinear)}) == RANKS


def test_resaving_refreshes_our_model_card_and_keeps_a_users(tmp_path):
    folder = tmp_path / "ckpt"
    small, _ = perturbed_lors_model("bert", ranks=[1, 1, 1])
    small.save_pretrained(folder)
    larger, _ = perturbed_lors_model("bert", ranks=[3, 3, 3])
    larger.save_pretrained(folder)
    card = (folder / "README.md").read_text()
    assert f"{parameter_report(larger).total.lors:,}" in card
    assert f"{parameter_report(small).total.lors:,}" not in card
    (folder / "README.md").write_text("# my own card\n")
    small.save_pretrained(folder)
    assert (folder / "README.md").read_text() == "# my own card\n"


def test_saving_a_model_whose_part_was_lorsified_names_the_fix(tmp_path):
    """lorsify(model.bert) gives model.bert its own config with the plan; saving the whole classifier then
    failed in write_model_card with "is not a LORS model ... lorsify it first", misleading."""
    model = transformers.BertForSequenceClassification(build("bert")[0].config)
    lorsify(model.bert, rank=2)
    with pytest.raises(ValueError, match=r"has LORS layers but no lors_config \(`lorsify` ran on its part `bert`"):
        model.save_pretrained(tmp_path / "whole")
    assert not (tmp_path / "whole").exists() or list((tmp_path / "whole").iterdir()) == []
    model.bert.save_pretrained(tmp_path / "part")  # the part saves and reloads
    assert is_lorsified(transformers.BertModel.from_pretrained(tmp_path / "part"))
