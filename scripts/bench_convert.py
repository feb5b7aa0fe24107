#!/usr/bin/env python
"""Benchmark: convert pretrained MiniLM and SmolLM2 to LORS, right after conversion and after recovery.

At each parameter budget (``--reductions``: fraction of the stacks' parameters removed, the same
private rank for every method) it compares the conversion methods (``--methods``):

- ``svd``: shared = mean of the layers, private = truncated SVD of the residuals (the baseline);
- ``alternating``: the same objective refined by alternating minimisation (``init="alternating"``);
- ``data-aware``: fitted to each projection's outputs on a few calibration batches
  (``lorsify(..., calibration_data=...)``), then refitted block by block on the converted model's
  own activations.

Measured right after conversion: MiniLM, ``1 - cosine`` between the dense and the converted sentence
embeddings (mean pooling over tokens) of held-out Rotten Tomatoes test sentences; SmolLM2, perplexity
on held-out Shakespeare test text. Then a short recovery (``--recover-minutes``, 0 skips it):
MiniLM, sentiment fine-tuning of the dense model and of the converted models the same way (task loss,
and task loss plus distillation from the fine-tuned dense model), test accuracy; SmolLM2, distillation
from the dense model (`lors_hf.distill.DistillationTrainer`) on Shakespeare train text, perplexity;
with ``--recover-lm-weight`` also the student's next-token loss, next to the dense model trained on
that loss the same way (the like-for-like reference, as both adapt to Shakespeare); with
``--recover-no-distill`` as well, the converted model is trained on that loss alone, exactly like the
reference (no teacher: each step costs about a third less).

Writes its section of docs/RESULTS.md (table, the command line, a PNG plot under docs/) and the raw
figures as JSON next to the plot, once the run has ended well. While it runs, its figures so far are in
``bench_convert.partial.json`` next to the JSON: a run that fails or is stopped leaves the earlier JSON
and section as they were, and the progress file shows what it measured.

Usage:
    python scripts/bench_convert.py --model all --out docs            # the full run (about 2 hours on 2 cores)
    python scripts/bench_convert.py --smoke --results-file /tmp/r.md   # tiny models and slices, seconds
    python scripts/bench_convert.py --from-json docs/bench_convert.json --out docs   # report only
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two cores shared with other jobs: busy-waiting OpenMP threads make LAPACK calls 10-100x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import atexit  # noqa: E402
import copy  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import transformers as tf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_results import (  # noqa: E402
    RESULTS_FILE,
    machine_description,
    refuse_smoke_into_docs,
    update_section,
    write_atomically,
)

import lors_hf  # noqa: E402
from lors_hf import LorsConfig, assets, get_lors_config, lorsify, parameter_report  # noqa: E402
from lors_hf.calibration import DEFAULT_DAMPING, checked_damping  # noqa: E402
from lors_hf.distill import DistillationTrainer  # noqa: E402

SECTION = "bench_convert"
METHODS = ("svd", "alternating", "data-aware")
SEED = 0


# ------------------------------------------------------------------------------------------ settings


def settings(smoke: bool) -> dict[str, Any]:
    """Sizes of every slice; --smoke shrinks models and data to seconds."""
    if smoke:
        return {"minilm_eval": 16, "minilm_calib": 8, "minilm_calib_batch": 4, "minilm_train": 32, "minilm_test": 16,
                "minilm_max_length": 32, "minilm_batch": 8, "minilm_max_steps": 2,
                "smol_eval_tokens": 256, "smol_window": 64, "smol_calib": 4, "smol_calib_batch": 2,
                "smol_train_chars": 200_000, "smol_train_window": 64, "smol_train_windows": 16,
                "smol_max_steps": 2}
    return {"minilm_eval": 1000, "minilm_calib": 256, "minilm_calib_batch": 32, "minilm_train": None,
            "minilm_test": None, "minilm_max_length": 64, "minilm_batch": 32, "minilm_max_steps": 100_000,
            "smol_eval_tokens": 16_384, "smol_window": 512, "smol_calib": 64, "smol_calib_batch": 4,
            "smol_train_chars": 4_000_000, "smol_train_window": 256, "smol_train_windows": 20_000,
            "smol_max_steps": 100_000}


def tiny(config: tf.PretrainedConfig) -> tf.PretrainedConfig:
    """The same architecture and vocabulary, shrunk (for --smoke)."""
    config = copy.deepcopy(config)
    if config.model_type == "bert":
        config.update({"hidden_size": 32, "num_hidden_layers": 6, "num_attention_heads": 2, "intermediate_size": 64})
    else:
        config.update({"hidden_size": 32, "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
                       "intermediate_size": 64, "head_dim": 8})
    return config


def load_pretrained(auto_class, path: str, smoke: bool, **kwargs):
    tf.set_seed(SEED)
    if smoke:
        config = tiny(tf.AutoConfig.from_pretrained(path, **kwargs))
        return auto_class.from_config(config, dtype=torch.float32).eval()
    return auto_class.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def convert(dense: torch.nn.Module, method: str, reduction: float, calibration: list | None,
            damping: float = DEFAULT_DAMPING):
    """A converted copy of `dense`, the private rank and the seconds it took (and, data-aware, the damping)."""
    model = copy.deepcopy(dense)
    tf.set_seed(SEED)
    start = time.perf_counter()
    if method == "svd":
        lorsify(model, LorsConfig(target_reduction=reduction, init="svd"))
    elif method == "alternating":
        lorsify(model, LorsConfig(target_reduction=reduction, init="alternating"))
    elif method == "data-aware":
        lorsify(model, LorsConfig(target_reduction=reduction, init="alternating"), calibration_data=calibration,
                calibration_damping=damping)
    else:
        raise ValueError(f"unknown method {method!r}")
    seconds = time.perf_counter() - start
    plan = get_lors_config(model)
    ranks = plan.private_ranks() or [0]
    kept_dense = sorted(name.rsplit(".", 1)[-1] for name in plan.dense_groups())
    report = parameter_report(model)
    return model.eval(), {"rank": ranks[0] if len(ranks) == 1 else ranks, "convert_s": round(seconds, 1),
                          **({"kept_dense": kept_dense} if kept_dense else {}),
                          "stack_reduction": round(report.stacks_total.reduction, 4),
                          "stack_params": report.stacks_total.lors, "stack_params_dense": report.stacks_total.dense,
                          **({"damping": damping} if method == "data-aware" else {})}


def kept_dense_note(row: dict) -> str:
    """The rank column's note on the projections the plan left dense (only rows made since lorsify does that)."""
    return f"; {', '.join(row['kept_dense'])} dense" if row.get("kept_dense") else ""


def conversion_key(row: dict) -> tuple[float, str, float | None]:
    """What makes a conversion row: budget, method and, data-aware, the damping."""
    return row["reduction"], row["method"], row.get("damping") if row["method"] == "data-aware" else None


def with_row(section: dict, row: dict) -> None:
    """Put a conversion `row` into `section`, in place of an earlier row of the same conversion (kept until then,
    so the progress file of a run that stops holds every figure)."""
    section["conversion"] = [r for r in section["conversion"] if conversion_key(r) != conversion_key(row)] + [row]


def method_label(row: dict) -> str:
    return f"{row['method']} (damping {row['damping']:g})" if row.get("damping") is not None else row["method"]


class TimeBudget(tf.TrainerCallback):
    """Stops training once `seconds` of wall time have passed."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True


def scratch_folder(prefix: str) -> str:
    """A temporary folder for the Trainers' output_dir (they save nothing there), removed when the script ends."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def training_arguments(output_dir: str, batch: int, learning_rate: float, max_steps: int,
                       schedule: str = "constant_with_warmup", **extra: Any) -> tf.TrainingArguments:
    return tf.TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch, learning_rate=learning_rate, max_steps=max_steps,
        lr_scheduler_type=schedule, warmup_steps=min(10, max_steps // 10), weight_decay=0.0,
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, seed=SEED, data_seed=SEED,
        disable_tqdm=True, dataloader_num_workers=0, **extra)


def train(trainer_class, model, dataset, args, minutes: float, **kwargs) -> dict[str, Any]:
    """Train within `minutes` of wall time; returns steps, seconds and the last logged losses."""
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, callbacks=[TimeBudget(minutes * 60)],
                            **kwargs)
    start = time.perf_counter()
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"steps": trainer.state.global_step, "train_s": round(time.perf_counter() - start, 1),
            "last_log": logs[-1] if logs else {}}


# -------------------------------------------------------------------------------------------- MiniLM


def minilm_tokenized(tokenizer, texts: list[str], max_length: int, batch: int) -> list[dict[str, torch.Tensor]]:
    return [tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            for i in range(0, len(texts), batch)]


@torch.no_grad()
def sentence_embeddings(model, batches) -> torch.Tensor:
    """Mean pooling over the non-padding tokens, as sentence-transformers does."""
    model.eval()
    out = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(out)


@torch.no_grad()
def accuracy(model, tokenizer, texts: list[str], labels: list[int], max_length: int) -> float:
    model.eval()
    correct = 0
    for batch, start in zip(minilm_tokenized(tokenizer, texts, max_length, 128), range(0, len(texts), 128),
                            strict=True):
        predictions = model(**batch).logits.argmax(-1)
        correct += (predictions == torch.tensor(labels[start:start + 128])).sum().item()
    return correct / len(texts)


def bench_minilm(args, sizes, results: dict, save, run: dict) -> None:
    """MiniLM: 1 - cosine of sentence embeddings after conversion; sentiment accuracy after fine-tuning.

    The model converted is the sentiment classifier (the pretrained encoder plus a seeded random head);
    the embeddings are its encoder's, so the converted models at the recovery budgets serve both parts.
    """
    path = assets.minilm_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    data = assets.rotten_tomatoes(seed=SEED)
    train_split, test_split = data["train"], data["test"]
    eval_batches = minilm_tokenized(tokenizer, list(test_split["text"])[:sizes["minilm_eval"]], 128, 64)
    calibration = minilm_tokenized(tokenizer, list(train_split["text"])[:sizes["minilm_calib"]], 128,
                                   sizes["minilm_calib_batch"])
    dense = load_pretrained(tf.AutoModelForSequenceClassification, path, args.smoke, num_labels=2)
    reference = sentence_embeddings(dense.base_model, eval_batches)
    recover = args.recover_minutes > 0
    earlier = results.get("minilm")  # with --merge: the figures of an earlier run
    # With --merge, a run that recovers nothing redoes only its conversions: the other rows (the fine-tuning ones
    # included) and the section's provenance stay, and its rows name it (`run`). A run that fine-tunes redoes
    # the whole section (its recovery rows compare models of that run with a dense model fine-tuned in it).
    partial = bool(earlier) and not recover
    section = results["minilm"] = earlier if partial else {"conversion": [], "recovery": []}
    section["eval_sentences"] = len(reference)
    section["calibration_sentences"] = sizes["minilm_calib"]
    kept: dict[tuple[float, str], tuple[torch.nn.Module, dict]] = {}
    for reduction in args.reductions:
        for method in args.methods:
            model, info = convert(dense, method, reduction, calibration, args.damping)
            embeddings = sentence_embeddings(model.base_model, eval_batches)
            cosine = torch.nn.functional.cosine_similarity(embeddings, reference).mean()
            row = {"reduction": reduction, "method": method, "error": round(1 - cosine.item(), 5), **info,
                   **({"run": run} if partial else {})}
            print(f"[minilm] {row}", flush=True)
            with_row(section, row)
            save()
            if recover and reduction in args.recover_reductions and method in args.recover_methods:
                kept[(reduction, method)] = (model, info)
    if not recover:
        return
    # Recovery: sentiment fine-tuning of the dense model and of the converted ones, the same way.
    train_texts = list(train_split["text"])[:sizes["minilm_train"]]  # a datasets Column: make it a list
    train_labels = list(train_split["label"])[:len(train_texts)]
    test_texts = list(test_split["text"])[:sizes["minilm_test"]]
    test_labels = list(test_split["label"])[:len(test_texts)]
    encoded = tokenizer(train_texts, truncation=True, max_length=sizes["minilm_max_length"])
    import datasets

    train_set = datasets.Dataset.from_dict({"input_ids": encoded["input_ids"],
                                            "attention_mask": encoded["attention_mask"], "labels": train_labels})
    collator = tf.DataCollatorWithPadding(tokenizer)
    workdir = scratch_folder("bench_convert_minilm_")

    def fine_tune(model, name: str, max_steps: int, minutes: float, teacher=None) -> dict[str, Any]:
        targs = training_arguments(f"{workdir}/{name}", sizes["minilm_batch"], 1e-4, max_steps, schedule="linear")
        model.train()
        if teacher is None:
            info = train(tf.Trainer, model, train_set, targs, minutes, data_collator=collator)
        else:
            info = train(DistillationTrainer, model, train_set, targs, minutes, data_collator=collator,
                         teacher_model=teacher, temperature=2.0, alpha_kl=1.0, alpha_hidden=1.0, alpha_task=1.0)
        info["accuracy"] = round(accuracy(model, tokenizer, test_texts, test_labels, sizes["minilm_max_length"]), 4)
        return info

    # Every model trains the same number of steps on the same batches (on a shared machine equal wall time
    # would be unequal work); --finetune-minutes only caps a run.
    steps = min(args.finetune_steps, sizes["minilm_max_steps"])
    dense_info = fine_tune(dense, "dense", steps, args.finetune_minutes)
    section["recovery"].append({"reduction": 0.0, "method": "dense", "recovery": "fine-tune", **dense_info})
    print(f"[minilm] dense fine-tuned: {dense_info}", flush=True)
    save()
    for (reduction, method), (model, info) in kept.items():
        recipes = ["fine-tune"]
        if method == args.recover_methods[-1]:  # distillation for the last (best) conversion only: run time
            recipes.append("fine-tune + distill")
        for recipe in recipes:
            student = copy.deepcopy(model) if recipe != recipes[-1] else model
            recovered = fine_tune(student, f"{method}-{reduction}-{len(recipe)}", steps, args.finetune_minutes,
                                  teacher=dense if "distill" in recipe else None)
            row = {"reduction": reduction, "method": method, "recovery": recipe, "rank": info["rank"],
                   "stack_reduction": info["stack_reduction"], **recovered, "dense_accuracy": dense_info["accuracy"]}
            print(f"[minilm] {row}", flush=True)
            section["recovery"].append(row)
            save()
            del student


# ------------------------------------------------------------------------------------------- SmolLM2


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 4) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of held-out text."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        ids = windows[start:start + batch]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def windows_of(ids: torch.Tensor, length: int, limit: int | None = None) -> torch.Tensor:
    usable = (len(ids) // length) * length
    out = ids[:usable].view(-1, length)
    return out if limit is None else out[:limit]


def bench_smollm2(args, sizes, results: dict, save, run: dict) -> None:
    path = assets.smollm2_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    splits = assets.shakespeare_splits()
    window = sizes["smol_window"]
    test_ids = tokenizer(splits["test"], return_tensors="pt")["input_ids"][0][:sizes["smol_eval_tokens"]]
    eval_windows = windows_of(test_ids, window)
    train_ids = tokenizer(splits["train"][:sizes["smol_train_chars"]], return_tensors="pt")["input_ids"][0]
    generator = torch.Generator().manual_seed(SEED)
    calib_window = min(256, window)
    all_windows = windows_of(train_ids, calib_window)
    picks = torch.randperm(len(all_windows), generator=generator)[:sizes["smol_calib"]]
    calibration = [all_windows[picks[i:i + sizes["smol_calib_batch"]]]
                   for i in range(0, len(picks), sizes["smol_calib_batch"])]
    dense = load_pretrained(tf.AutoModelForCausalLM, path, args.smoke)
    earlier = results.get("smollm2")  # with --merge: the figures of an earlier run
    if args.recover_only and not earlier:
        raise SystemExit("--recover-only needs the conversion figures of an earlier run: add --merge.")
    # the conversions this run makes (--recover-only: only those it recovers); with --merge it keeps the others
    recovers = {(r, args.methods[-1]) for r in args.recover_reductions} if args.recover_minutes > 0 else set()
    redo = {(r, m) for r in args.reductions for m in args.methods if not args.recover_only or (r, m) in recovers}
    redo_keys = {conversion_key({"reduction": r, "method": m, "damping": args.damping}) for r, m in redo}
    keeps_conversions = any(conversion_key(r) not in redo_keys for r in (earlier or {}).get("conversion", []))
    # A partial run keeps the section's provenance and names itself (`run`) on each row it adds; a run that
    # redoes every conversion becomes the section's run and names the earlier run on the recovery rows it keeps.
    partial = bool(earlier) and (args.recover_only or keeps_conversions)
    earlier_recovery = [dict(r) for r in (earlier or {}).get("recovery", [])]
    if earlier and not partial:
        for row in earlier_recovery:
            row.setdefault("run", {k: earlier.get(k) for k in ("command", "date", "wall_minutes")})
    recipes = recovery_recipes(args) if args.recover_minutes > 0 else []  # a run with no recovery keeps them all
    batch = args.recover_batch
    planned = min(args.recover_steps, sizes["smol_max_steps"])
    # this run redoes its recovery recipes with its settings and keeps every other row: the same recipe with
    # other settings (and that row's dense reference) stays next to this run's
    recovery_settings = {"batch": batch, "learning_rate": args.recover_lr, "planned_steps": planned,
                         "damping": args.damping}
    kept_rows = [r for r in earlier_recovery if not redone_by(r, recipes, recovery_settings)]
    # a partial run keeps every earlier conversion row until its own row of that conversion replaces it (`with_row`)
    section = results["smollm2"] = {**(earlier if partial else {"conversion": []}), "recovery": kept_rows}
    start = time.perf_counter()
    section["dense_ppl"] = round(perplexity(dense, eval_windows), 3)
    section["eval_tokens"] = eval_windows.numel()
    section["calibration_tokens"] = sum(batch.numel() for batch in calibration)
    print(f"[smollm2] dense perplexity {section['dense_ppl']} on {eval_windows.numel()} tokens "
          f"({time.perf_counter() - start:.0f}s)", flush=True)
    save()
    kept: dict[tuple[float, str], torch.nn.Module] = {}
    for reduction in args.reductions:
        for method in args.methods:
            if (reduction, method) not in redo:
                continue  # its figure stays the earlier run's
            model, info = convert(dense, method, reduction, calibration, args.damping)
            ppl = perplexity(model, eval_windows)
            row = {"reduction": reduction, "method": method, "error": round(ppl, 3), **info,
                   **({"run": run} if partial else {})}
            print(f"[smollm2] {row}", flush=True)
            with_row(section, row)
            save()
            if (reduction, method) in recovers:
                kept[(reduction, method)] = model
            else:
                del model
    if args.recover_minutes <= 0:
        return
    # Recovery on Shakespeare train text: distillation from the dense model (KL on logits + hidden states),
    # optionally plus the next-token loss, or (--recover-no-distill) the next-token loss alone.
    import datasets

    train_windows = windows_of(train_ids, sizes["smol_train_window"])
    train_windows = train_windows[torch.randperm(len(train_windows), generator=generator)[:sizes["smol_train_windows"]]]
    columns = {"input_ids": train_windows.tolist()}
    if args.recover_lm_weight > 0:  # the student's own next-token loss on the training text
        columns["labels"] = columns["input_ids"]
    train_set = datasets.Dataset.from_dict(columns)
    workdir = scratch_folder("bench_convert_smollm2_")

    def record(row: dict, targs: tf.TrainingArguments) -> None:
        row.update(dense_ppl=section["dense_ppl"], batch=batch, learning_rate=targs.learning_rate,
                   schedule=getattr(targs.lr_scheduler_type, "value", targs.lr_scheduler_type),
                   planned_steps=targs.max_steps)
        if row["method"] != "dense":
            row["calibration_tokens"] = section["calibration_tokens"]
            if row["method"] == "data-aware":
                row["damping"] = args.damping
        if partial:
            row["run"] = run
        print(f"[smollm2] {row}", flush=True)
        section["recovery"].append(row)
        save()

    if args.recover_lm_weight > 0:  # like-for-like reference: the original model trained on the same text
        # an earlier run's reference is kept when it trained the same recipe to the end within this budget
        same = lm_reference(recovery_settings, earlier_recovery)
        if same and same["steps"] == planned and same["train_s"] <= args.recover_minutes * 60:
            made = same.get("run") or section  # a row with no `run` is the section's own
            print(f"[smollm2] keeping the dense LM fine-tune of {made.get('date')}: same batch, lr and planned "
                  f"steps, all {planned} steps done in {same['train_s']} s", flush=True)
            section["recovery"].append(same)
            save()
        else:
            reference = copy.deepcopy(dense)
            for name, parameter in reference.named_parameters():
                parameter.requires_grad_(".layers." in name)
            targs = training_arguments(f"{workdir}/dense", batch, args.recover_lr, planned, schedule="cosine")
            info = train(tf.Trainer, reference.train(), train_set, targs, args.recover_minutes)
            info["ppl_after"] = round(perplexity(reference, eval_windows), 3)
            del reference
            record({"reduction": 0.0, "method": "dense", "recovery": recipes[1], "ppl_before": section["dense_ppl"],
                    **info}, targs)
    for (reduction, method), student in kept.items():
        made = conversion_key({"reduction": reduction, "method": method, "damping": args.damping})
        before = next(r["error"] for r in section["conversion"] if conversion_key(r) == made)
        for name, parameter in student.named_parameters():  # recovery trains the stack, not the embeddings
            parameter.requires_grad_("lors" in name or ".layers." in name)
        # Cosine decay over --recover-steps (the wall-time budget may stop it earlier): an earlier run at a
        # constant 2e-4 diverged after ~110 steps; decaying from the same peak did not.
        targs = training_arguments(f"{workdir}/{method}-{reduction}", batch, args.recover_lr, planned,
                                   schedule="cosine")
        if args.recover_no_distill:  # the dense reference's recipe, on the converted model
            info = train(tf.Trainer, student.train(), train_set, targs, args.recover_minutes)
        else:
            info = train(DistillationTrainer, student.train(), train_set, targs, args.recover_minutes,
                         teacher_model=dense, temperature=1.0, alpha_kl=1.0, alpha_hidden=1.0,
                         alpha_task=args.recover_lm_weight)
        info["ppl_after"] = round(perplexity(student, eval_windows), 3)
        record({"reduction": reduction, "method": method, "recovery": recipes[0], "ppl_before": before,
                "lm_weight": args.recover_lm_weight, **info}, targs)


def redone_by(row: dict, recipes: list[str], settings: dict) -> bool:
    """Whether a run that makes `recipes` (LORS recipe, then dense reference's) with `settings` (batch, peak lr,
    planned steps; a data-aware conversion's damping) makes `row` again."""
    same_recipe = row["recovery"] in (recipes[1:] if row["method"] == "dense" else recipes[:1])
    if row["method"] != "data-aware":  # the damping is a data-aware conversion's setting: dense and svd rows have none
        settings = {key: value for key, value in settings.items() if key != "damping"}
    return bool(recipes) and same_recipe and all(row.get(key) == value for key, value in settings.items())


def recovery_recipes(args) -> list[str]:
    """The `recovery` labels of the SmolLM2 rows a run makes: the LORS model's, then the dense reference's."""
    if args.recover_no_distill:
        return ["LM fine-tune", "LM fine-tune"]
    if args.recover_lm_weight > 0:
        return ["distill + LM loss", "LM fine-tune"]
    return ["distill"]


# -------------------------------------------------------------------------------------------- report


def find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def functional_error(key: str, row: dict, section: dict) -> float:
    """MiniLM: 1 - cosine as measured; SmolLM2: excess loss over the dense model, ln(ppl / dense ppl) nats/token."""
    return row["error"] if key == "minilm" else math.log(row["error"] / section["dense_ppl"])


def lm_reference(row: dict, rows: list[dict]) -> dict | None:
    """The dense `LM fine-tune` row trained with `row`'s batch, peak lr and planned steps (its like-for-like)."""
    return find(rows, method="dense", recovery="LM fine-tune", batch=row.get("batch"),
                learning_rate=row.get("learning_rate"), planned_steps=row.get("planned_steps"))


def markdown(results: dict, command: str, plot_name: str | None) -> str:
    meta = results["meta"]
    lines = [
        "## Converting pretrained models: mean+SVD, alternating, data-aware; recovery",
        "",
        *command_lines(results, command),
        f"Machine: {meta['machine']}; {meta['threads']} threads, shared with other jobs (timings are noisy); "
        f"seed {SEED}."
        + (" **Smoke run: tiny random models, tiny slices; the figures mean nothing.**" if meta["smoke"] else ""),
        "",
        "Same private rank for every method at a given budget (`target_reduction` = fraction of the stacks' "
        "parameters removed; the rank is the largest that reaches it. Rows made before lors_hf left dense the "
        "projections that LORS would not make smaller: there a projection too small for the rank keeps its "
        "largest rank, `min(d_out, d_in)`, and the `rank` column lists both; later rows name the projections "
        "kept dense, which data-aware conversion refits at full rank in its sequential round). "
        "Error right after conversion, no training: "
        "MiniLM `1 - cosine` between dense and converted sentence embeddings (mean pooling) of held-out "
        "Rotten Tomatoes test sentences; SmolLM2-135M-Instruct perplexity on held-out Shakespeare test text. "
        "`data-aware` = `lorsify(..., init=\"alternating\", calibration_data=...)`: fit to each projection's outputs "
        "on the calibration batches (bias correction where there are biases), then one sequential round "
        "that refits block by block, and within a block stage by stage in execution order (q/k/v, then the "
        "output projection, then the MLP's input and output projections), on the inputs the converted model "
        "itself feeds each stage; the ridge on the inputs' moments (`calibration_damping`) is in the method column. "
        "`vs svd` = functional error / that of mean+SVD at the same budget, where the functional error is "
        "`1 - cosine` for MiniLM and, for SmolLM2, the excess loss over the dense model, "
        "`ln(ppl / dense ppl)` nats/token (a perplexity ratio would call a model at 2x the dense perplexity "
        "and one at 1,000x almost equally good next to mean+SVD's 10^6x).",
        "",
    ]
    if plot_name:
        lines += [f"![conversion error]({plot_name})", ""]
    lines += ["| model | target | stacks removed | rank | method | error after conversion | vs svd | convert s |",
              "|---|---|---|---|---|---|---|---|"]
    later_runs = later_conversion_runs(results)
    for key, label, unit in (("minilm", "MiniLM-L6", "1-cos"), ("smollm2", "SmolLM2-135M", "ppl")):
        section = results.get(key)
        if not section:
            continue
        if key == "smollm2":
            lines.append(f"| {label} | dense | 0% | - | - | ppl {section['dense_ppl']} | - | - |")
        for row in sorted(section["conversion"], key=lambda r: (r["reduction"], METHODS.index(r["method"]),
                                                                 -(r.get("damping") or 0))):
            base = find(section["conversion"], reduction=row["reduction"], method="svd")
            base_error = functional_error(key, base, section) if base else 0.0
            ratio = f"{functional_error(key, row, section) / base_error:.3f}" if base_error > 0 else "-"
            mark = f"<sup>{later_runs.index(run_key(row['run'])) + 1}</sup>" if row.get("run") else ""
            lines.append(f"| {label} | {row['reduction']:.0%} | {row['stack_reduction']:.1%} | {row['rank']}{kept_dense_note(row)} | "
                         f"{method_label(row)}{mark} | {unit} {row['error']:.4g} | {ratio} | {row['convert_s']} |")
    redone = [f"<sup>{i + 1}</sup> converted again by `{cmd}` ({day}), with the code of that day; the model's "
              "other rows are from its first command above.  " for i, (cmd, day) in enumerate(later_runs)]
    lines += (["", *redone] if redone else []) + ["", f"MiniLM: {results.get('minilm', {}).get('eval_sentences', '?')} test sentences, "
              f"{results.get('minilm', {}).get('calibration_sentences', '?')} calibration sentences (train split). "
              f"SmolLM2: {results.get('smollm2', {}).get('eval_tokens', '?')} test tokens (windows of "
              f"{meta['sizes']['smol_window']}), {results.get('smollm2', {}).get('calibration_tokens', '?')} "
              "calibration tokens (train split).", ""]
    recovery_rows = [(k, r) for k in ("minilm", "smollm2")  # the dense rows (the references) first
                     for r in sorted(results.get(k, {}).get("recovery", []), key=lambda r: r["method"] != "dense")]
    lm_rows = [r for k, r in recovery_rows if k == "smollm2" and r.get("lm_weight")]
    lm_alone = any(r["method"] != "dense" and r["recovery"] == "LM fine-tune" for k, r in recovery_rows)
    if recovery_rows:
        lines += ["### After recovery", "",
                  "MiniLM: sentiment fine-tuning (train split, batch 32, max length 64, AdamW lr 1e-4 with warm-up "
                  "and linear decay over the planned steps, task loss), the same number of steps on the same batches for every model (`steps`). "
                  "`fine-tune + distill` adds "
                  "`DistillationTrainer` losses towards the fine-tuned dense classifier (KL at T=2, hidden states, "
                  "task loss; weights 1/1/1). SmolLM2: `DistillationTrainer` from the dense model on Shakespeare "
                  "train text (windows of 256 tokens; AdamW, cosine decay over the planned steps; batch, peak lr "
                  "and planned steps in the `recovery` column; KL at T=1 + hidden states, no task loss; embeddings "
                  "frozen) within the wall-time budget." + (
                      " `distill + LM loss` adds the student's next-token loss on the same training text (weight "
                      f"{lm_rows[0]['lm_weight']:g}). `dense` + `LM fine-tune` is the original model trained on that "
                      "loss alone with the same batches, lr schedule and time budget: the like-for-like reference "
                      "of each row with the same batch, lr and planned steps, since training on Shakespeare also adapts a model to the test text's domain."
                      if lm_rows else "") + (
                      " A converted model's `LM fine-tune` is that reference's recipe applied to it: the next-token "
                      "loss alone, no teacher." if lm_alone else ""),
                  "",
                  "| model | target | method | recovery | steps | minutes | result | reference |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, row in recovery_rows:
            minutes = f"{row['train_s'] / 60:.1f}"
            if key == "minilm":
                result = f"accuracy {row['accuracy']:.2%}"
                reference = "-" if row["method"] == "dense" else (
                    f"dense {row['dense_accuracy']:.2%} ({100 * (row['accuracy'] - row['dense_accuracy']):+.2f} pt)")
                target = "-" if row["method"] == "dense" else f"{row['reduction']:.0%}"
                lines.append(f"| MiniLM-L6 sentiment | {target} | {row['method']} | {row['recovery']} | "
                             f"{row['steps']} | {minutes} | {result} | {reference} |")
            else:
                ratio = row["ppl_after"] / row["dense_ppl"]
                calibrated = (f", from {row['calibration_tokens']} calibration tokens"
                              if row.get("calibration_tokens") else "")
                recipe = (f"{row['recovery']} (batch {row.get('batch', 4)}, lr {row.get('learning_rate', 1e-4):g}, "
                          f"{row.get('planned_steps', '?')} planned{calibrated})")
                reference = f"original {row['dense_ppl']} (x{ratio:.3f})"
                like = lm_reference(row, results["smollm2"]["recovery"]) if row.get("lm_weight") else None
                if like:
                    reference += f"; dense + LM fine-tune {like['ppl_after']} (x{row['ppl_after'] / like['ppl_after']:.3f})"
                target = "-" if row["method"] == "dense" else f"{row['reduction']:.0%}"
                start = next((r for r in results["smollm2"]["conversion"] if conversion_key(r) == conversion_key(row)),
                             None)
                earlier = " (an earlier run's conversion)" if start and start["error"] != row["ppl_before"] else ""
                lines.append(f"| SmolLM2-135M | {target} | {method_label(row)} | {recipe} | "
                             f"{row['steps']} | {minutes} | ppl {row['ppl_before']}{earlier} -> {row['ppl_after']} | "
                             f"{reference} |")
        lines.append("")
    lines += ["### Targets", ""] + [f"- {line}" for line in target_lines(results)]
    return "\n".join(lines) + "\n"


def run_key(run: dict) -> tuple[str, str]:
    return run["command"], run["date"]


def later_conversion_runs(results: dict) -> list[tuple[str, str]]:
    """The runs, after a model's first command, that converted some of its models again (each marked in the table)."""
    keys = [run_key(row["run"]) for key in ("minilm", "smollm2")
            for row in results.get(key, {}).get("conversion", []) if row.get("run")]
    return list(dict.fromkeys(keys))


def command_lines(results: dict, command: str) -> list[str]:
    """The command (and wall time) behind each model's figures: one line if a single run made them all."""
    runs = {}
    for key, label in (("minilm", "MiniLM"), ("smollm2", "SmolLM2")):
        if key in results:
            section = results[key]
            wall = section.get("wall_minutes", results["meta"].get("wall_minutes", "?"))
            scope = f" ({section['wall_scope']})" if section.get("wall_scope") else ""
            runs.setdefault(section.get("command") or command, []).append(
                f"{label} {wall} min{scope}, {section.get('date', results['meta']['date'])}")
    for key, label in (("minilm", "MiniLM"), ("smollm2", "SmolLM2")):
        section = results.get(key, {})
        # a later run that redid some rows: a recovery (and the conversion it starts from), or conversions alone
        for part_name, rows in (("recovery", section.get("recovery", [])), ("conversions", section.get("conversion", []))):
            for run in (row["run"] for row in rows if row.get("run")):
                parts = runs.setdefault(run["command"], [])
                if any(p.startswith(f"{label} recovery ") and p.endswith(run["date"]) for p in parts):
                    continue  # a recovery run: its conversion is part of it
                part = f"{label} {part_name} {run.get('wall_minutes', '?')} min, {run['date']}"
                if part not in parts:
                    parts.append(part)
    return [f"Command: `{cmd}` ({'; '.join(parts)})  " for cmd, parts in runs.items()]


def target_lines(results: dict) -> list[str]:
    out = []
    minilm, smol = results.get("minilm", {}), results.get("smollm2", {})
    for key, label, section in (("minilm", "MiniLM 1-cos", minilm), ("smollm2", "SmolLM2 ppl", smol)):
        base = find(section.get("conversion", []), reduction=0.5, method="svd")
        for aware in [r for r in section.get("conversion", []) if r["reduction"] == 0.5 and r["method"] == "data-aware"]:
            if not base:
                break
            errors = [functional_error(key, row, section) for row in (aware, base)]
            gain = 1 - errors[0] / errors[1] if errors[1] > 0 else 0.0
            if key == "minilm":
                what = f"{label} at 50%: {method_label(aware)} {aware['error']:.4g} vs mean+SVD {base['error']:.4g}"
            else:  # functional error of a language model: excess loss (nats/token) over the dense model
                what = (f"{label} at 50%: {method_label(aware)} {aware['error']:.4g} vs mean+SVD {base['error']:.4g} "
                        f"(dense {smol['dense_ppl']}); excess loss over dense {errors[0]:.3f} vs {errors[1]:.3f} "
                        "nats/token")
            out.append(f"{what}: {gain:.1%} lower error; target >= 50% lower: {'met' if gain >= 0.5 else 'MISSED'}.")
    dense = find(minilm.get("recovery", []), method="dense")
    for row in minilm.get("recovery", []):
        if row["method"] != "dense" and dense:
            gap = 100 * (dense["accuracy"] - row["accuracy"])
            out.append(f"MiniLM {row['reduction']:.0%} {row['method']} + {row['recovery']}: accuracy "
                       f"{100 * row['accuracy']:.2f}% vs dense fine-tuning {100 * dense['accuracy']:.2f}% "
                       f"({-gap:+.2f} pt); target within 1 pt: {'met' if gap <= 1 else 'MISSED'}.")
    for row in smol.get("recovery", []):
        if row["method"] == "dense":
            continue
        ratio = row["ppl_after"] / row["dense_ppl"]
        line = (f"SmolLM2 {row['reduction']:.0%} {method_label(row)} + {row['recovery']} ({row['train_s'] / 60:.0f} min, "
                f"{row['steps']} of {row.get('planned_steps', '?')} planned steps, lr {row.get('learning_rate', '?')}): "
                f"perplexity x{ratio:.3f} of the original; target within 10%: {'met' if ratio <= 1.10 else 'MISSED'}")
        reference = lm_reference(row, smol["recovery"]) if row.get("lm_weight") else None
        if reference:
            like = row["ppl_after"] / reference["ppl_after"]
            line += (f"; like for like, against the dense model trained the same way ({reference['ppl_after']}): "
                     f"x{like:.3f}, {'within' if like <= 1.10 else 'not within'} 10%")
        out.append(line + ".")
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, t, y) for k, t, y in (("minilm", "MiniLM-L6: 1 - cosine (sentence embeddings)", "1 - cosine"),
                                        ("smollm2", "SmolLM2-135M: test perplexity", "perplexity"))
              if results.get(k, {}).get("conversion")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, title, ylabel) in zip(axes[0], panels, strict=True):
        rows = results[key]["conversion"]
        for method in dict.fromkeys(method_label(r) for r in rows):
            points = sorted((r["reduction"], r["error"]) for r in rows if method_label(r) == method)
            ax.plot([100 * x for x, _ in points], [y for _, y in points], marker="o", label=method)
        if key == "smollm2":
            ax.axhline(results[key]["dense_ppl"], color="gray", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("stack parameters removed (%)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Right after conversion, equal parameter count (lower is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out_dir: Path, results_file: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_path = out_dir / f"{SECTION}.png"
    plot(results, plot_path)
    try:
        plot_ref = os.path.relpath(plot_path, results_file.resolve().parent)
    except ValueError:
        plot_ref = str(plot_path)
    return update_section(SECTION, markdown(results, command, plot_ref), results_file=results_file)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["minilm", "smollm2", "all"], default="all")
    parser.add_argument("--reductions", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--recover-minutes", type=float, default=30.0,
                        help="SmolLM2 distillation budget (wall minutes); 0 skips every recovery run")
    parser.add_argument("--finetune-steps", type=int, default=320,
                        help="steps of each MiniLM sentiment fine-tuning run, dense and converted alike "
                             "(320 x batch 32 = one epoch of the train split)")
    parser.add_argument("--finetune-minutes", type=float, default=10.0,
                        help="wall-time cap of each MiniLM fine-tuning run (a run that hits it trains fewer steps)")
    parser.add_argument("--recover-reductions", type=float, nargs="+", default=[0.5],
                        help="budgets at which recovery runs (the long runs: 50%% only by default)")
    parser.add_argument("--recover-methods", nargs="+", choices=METHODS, default=["svd", "data-aware"],
                        help="MiniLM: conversions fine-tuned; the last one also with distillation")
    parser.add_argument("--smoke", action="store_true", help="tiny random models and tiny slices (CI)")
    parser.add_argument("--out", default=None,
                        help="folder of the plot and the JSON (default docs/, with --smoke the results file's folder)")
    parser.add_argument("--results-file", default=None, help="markdown file to update (default RESULTS.md in "
                        "--out, else docs/RESULTS.md; required with --smoke)")
    parser.add_argument("--from-json", default=None, help="only rewrite the report from saved results")
    parser.add_argument("--recover-steps", type=int, default=480,
                        help="planned steps of the SmolLM2 distillation (the LR decays over them)")
    parser.add_argument("--recover-lr", type=float, default=2e-4,
                        help="peak learning rate of the SmolLM2 distillation (cosine decay over --recover-steps)")
    parser.add_argument("--recover-batch", type=int, default=2,
                        help="windows of 256 tokens per SmolLM2 distillation step")
    parser.add_argument("--recover-lm-weight", type=float, default=0.0,
                        help="SmolLM2: add the next-token loss on the training text to the distillation, with this "
                             "weight, and train the dense model on that loss alone the same way as the reference")
    parser.add_argument("--recover-no-distill", action="store_true",
                        help="SmolLM2: train the converted model on the next-token loss alone (no teacher), the "
                             "same way as the dense reference (needs --recover-lm-weight)")
    parser.add_argument("--recover-only", action="store_true",
                        help="SmolLM2: convert only the models to recover; keep the other figures (needs --merge)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the figures of the JSON of an earlier run that this run does not redo: the other "
                             "model's; the conversion rows of other budgets, methods or dampings; SmolLM2's recovery "
                             "rows of other recipes (or the same recipe with another batch, peak lr or planned "
                             "steps). A MiniLM run that fine-tunes (--recover-minutes > 0) redoes MiniLM's section")
    parser.add_argument("--damping", type=float, default=DEFAULT_DAMPING,
                        help="data-aware conversion: lorsify's calibration_damping (default: the library's, "
                             f"{DEFAULT_DAMPING}); a SmolLM2 run with another damping keeps the rows of the earlier one")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    refuse_smoke_into_docs(parser, args)
    if args.recover_no_distill and args.recover_lm_weight <= 0:
        parser.error("--recover-no-distill trains on the next-token loss alone: give it --recover-lm-weight 1.")
    try:
        checked_damping(args.damping, "--damping")
    except ValueError as err:
        parser.error(str(err))
    for value in [*args.reductions, *args.recover_reductions]:
        if not 0 < value < 1:
            parser.error(f"reductions must lie in (0, 1), got {value}")
    if args.results_file is None and args.out is not None:
        # the report goes with the figures and the plot it shows: `--out /tmp/x` updated docs/RESULTS.md,
        # with a plot link into /tmp/x
        args.results_file = str(Path(args.out) / RESULTS_FILE.name)
    return args


def read_results(path: Path) -> dict:
    """The saved figures; an older file's single ``recovery_run`` becomes the ``run`` of each recovery row."""
    results = json.loads(path.read_text())
    for key in ("minilm", "smollm2"):
        legacy = results.get(key, {}).pop("recovery_run", None)
        for row in results.get(key, {}).get("recovery", []) if legacy else []:
            row.setdefault("run", legacy)
    smol = results.get("smollm2", {})
    for row in smol.get("recovery", []):  # rows older than the field: made from the section's calibration
        if row["method"] != "dense" and "calibration_tokens" in smol:
            row.setdefault("calibration_tokens", smol["calibration_tokens"])
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python scripts/bench_convert.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                      else argv))
    results_file = Path(args.results_file) if args.results_file else RESULTS_FILE
    out_dir = Path(args.out) if args.out else (results_file.parent if args.smoke else RESULTS_FILE.parent)
    json_path = out_dir / f"{SECTION}.json"
    progress_path = out_dir / f"{SECTION}.partial.json"  # this run's figures until it ends well
    if args.from_json:
        results = read_results(Path(args.from_json))
        print(write_report(results, out_dir, results_file, results["meta"]["command"]))
        return
    torch.set_num_threads(args.threads)
    tf.logging.set_verbosity_error()
    sizes = settings(args.smoke)
    results: dict[str, Any] = {"meta": {"command": command, "machine": machine_description(), "threads": args.threads,
                                        "date": date.today().isoformat(), "smoke": args.smoke, "sizes": sizes,
                                        "lors_hf": lors_hf.__version__}}
    out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each figure: a run that stops keeps what it measured, in the progress file
        write_atomically(progress_path, json.dumps(results, indent=1))

    if args.merge and json_path.exists():  # keep the other model's figures from the earlier run
        earlier = read_results(json_path)
        for key in ("minilm", "smollm2"):
            if key in earlier:  # the model this run benchmarks decides what it keeps of it
                results[key] = earlier[key]
                if "command" not in results[key]:  # a run that did both models: its command and total time
                    results[key].update(command=earlier["meta"].get("command"), date=earlier["meta"].get("date"),
                                        wall_minutes=earlier["meta"].get("wall_minutes"), wall_scope="whole run")
    total = time.perf_counter()
    # this run, as the rows of a partial SmolLM2 run name it from the moment they are saved (the wall time comes last)
    run = {"command": command, "date": date.today().isoformat()}
    try:
        for key, bench in (("minilm", functools.partial(bench_minilm, run=run)),
                           ("smollm2", functools.partial(bench_smollm2, run=run))):
            if args.model not in (key, "all"):
                continue
            start = time.perf_counter()
            bench(args, sizes, results, save)
            wall_minutes = round((time.perf_counter() - start) / 60, 1)
            if "command" in results[key]:  # a partial run kept the section's provenance; its rows name this run
                run["wall_minutes"] = wall_minutes
            else:
                results[key].update(run, wall_minutes=wall_minutes)
            save()
    except BaseException:  # failed or stopped: the earlier figures stay whole; say where this run's are
        print(f"bench_convert: the run stopped; {json_path} is as it was, and this run's figures so far are in "
              f"{progress_path}", file=sys.stderr, flush=True)
        raise
    results["meta"]["wall_minutes"] = round((time.perf_counter() - total) / 60, 1)
    # the run ended well: its figures replace the earlier JSON in one step
    write_atomically(json_path, json.dumps(results, indent=1))
    progress_path.unlink(missing_ok=True)
    path = write_report(results, out_dir, results_file, command)
    print(f"wrote {path} and {out_dir / (SECTION + '.png')} in {results['meta']['wall_minutes']} min")


if __name__ == "__main__":
    main()
