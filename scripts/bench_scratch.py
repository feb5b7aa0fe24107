#!/usr/bin/env python
"""The paper's setting from scratch: a GPT-2-style character model on Shakespeare, dense against LORS.

Every variant is trained from random initialisation on the same token budget (same batches, same
optimiser, same schedule, same learning rate for every parameter, LORS factors included, unless
``--b-lr-ratio`` gives the factors ``lors_B`` a larger one or ``--stack-lr-ratio`` the LORS stack its own)
and scored by held-out perplexity on the test split:

* ``dense``: the GPT-2 decoder as configured (default 8 layers, width 256, 4 heads, context 128).
* ``lors-60`` / ``lors-70``: the same model through ``lorsify(model, target_reduction=0.6 / 0.7,
  init="scratch")`` (the paper's init: shared weight = the first layer's dense init, ``A``
  Kaiming-uniform, ``B`` zeros).
* ``shared``: full sharing, rank 0 (ALBERT-style; only biases and LayerNorms stay private).
* ``shallow``: a dense model with fewer layers (and a width adjusted to match) whose stack holds about as
  many parameters as the ``lors-60`` stack.

Tokens are characters: the vocabulary is the set of characters of the training split (80 for the
bundled plays); a character unseen in training would map to an extra ``<unk>`` id.

Usage:
    HF_HUB_OFFLINE=1 python scripts/bench_scratch.py                 # default CPU run, writes docs/RESULTS.md
    HF_HUB_OFFLINE=1 python scripts/bench_scratch.py --preset long   # 20x the steps at width 128 (own section)
    HF_HUB_OFFLINE=1 python scripts/bench_scratch.py --preset long --b-lr-ratio 8   # lors_B learns 8x faster
    HF_HUB_OFFLINE=1 python scripts/bench_scratch.py --preset long --lr 4e-3 --b-lr-ratio 8 --stack-lr-ratio 0.5
    # data-limited: 15 epochs of the first 100k characters, test ppl also at each run's best validation step
    HF_HUB_OFFLINE=1 python scripts/bench_scratch.py --preset long --steps 1500 --lr 4e-3 --b-lr-ratio 8 \
        --stack-lr-ratio 0.5 --train-chars 100000 --eval-every 100
    # the issue's model at 213x the default budget, on a GPU (bash scripts/device/run_gpu.sh speed-scratch)
    HF_HUB_OFFLINE=1 python scripts/bench_scratch.py --preset large --b-lr-ratio 8 --dropout 0.1 --device cuda --bf16
    HF_HUB_OFFLINE=1 python scripts/bench_scratch.py --smoke --results-file /tmp/r.md   # seconds
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from bench_results import (
    RESULTS_FILE,
    device_section,
    machine_description,
    refuse_smoke_into_docs,
    run_in_processes,
    setup_run,
    update_section,
)
from transformers import GPT2Config, GPT2LMHeadModel

from lors_hf import get_lors_config, lors_parameter_groups, lorsify, parameter_report
from lors_hf.assets import shakespeare_splits

SECTION = "bench_scratch"  # "bench_scratch_gpu" for a --device cuda run, so CPU and GPU figures coexist
DEFAULT_LR = 2e-3
PRESETS: dict[str, dict[str, int]] = {
    # 153.6k tokens in 150 steps: the model the issue names (8 x 256), ~25 min on 2 cores.
    "default": {"layers": 8, "d_model": 256, "seq_len": 128, "batch_size": 8, "steps": 150, "jobs": 1},
    # 3.07M tokens in 3,000 steps: a narrower model so that 20x the steps fit in ~45 min with 2 runs at once.
    "long": {"layers": 8, "d_model": 128, "seq_len": 64, "batch_size": 16, "steps": 3000, "jobs": 2},
    # 32.8M tokens (7.3 epochs) in 1,000 steps of 128 x 256: the model on one GPU, 5 runs at once.
    "large": {"layers": 8, "d_model": 256, "seq_len": 256, "batch_size": 128, "steps": 1000, "jobs": 5},
}
"""Model shape and budget of each ``--preset`` (explicit flags override them). A preset other than
``default`` writes its own RESULTS.md section, ``bench_scratch_<preset>``."""
VARIANT_NAMES = ("dense", "lors-60", "lors-70", "shared", "shallow")


# ----------------------------------------------------------------------------------------------- data


@dataclass
class CharData:
    """Character-level encoding of the Shakespeare splits."""

    vocabulary: list[str]
    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary) + 1  # + <unk>


def _encode(text: str, codepoints: np.ndarray) -> torch.Tensor:
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(codepoints, points)
    ids = np.minimum(ids, len(codepoints) - 1)
    unknown = codepoints[ids] != points
    ids[unknown] = len(codepoints)  # <unk>
    return torch.from_numpy(ids.astype(np.int64))


def load_char_data() -> CharData:
    """Shakespeare train/validation/test as character ids (vocabulary = characters of the train split).

    Example:
        >>> data = load_char_data()  # doctest: +SKIP
        >>> data.vocab_size, data.train.shape  # doctest: +SKIP
        (81, torch.Size([4488863]))
    """
    splits = shakespeare_splits()
    vocabulary = sorted(set(splits["train"]))
    codepoints = np.array([ord(c) for c in vocabulary], dtype=np.uint32)
    return CharData(vocabulary, *(_encode(splits[name], codepoints) for name in ("train", "validation", "test")))


def sample_batch(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``(batch_size, seq_len + 1)`` random windows of `ids` (inputs are ``[:, :-1]``, targets ``[:, 1:]``)."""
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
    return ids[starts[:, None] + torch.arange(seq_len + 1)]


# --------------------------------------------------------------------------------------------- models


@dataclass
class VariantSpec:
    """How to build one variant: a GPT-2 shape plus, for LORS variants, the `lorsify` arguments."""

    name: str
    layers: int
    width: int
    lorsify_kwargs: dict | None = None
    description: str = ""


@dataclass
class RunResult:
    variant: str
    seed: int
    stack_params: int
    model_params: int
    rank: str
    test_nll: float
    validation_nll: float
    train_seconds: float
    losses: list[float] = field(default_factory=list)
    # with --eval-every: the step of the lowest validation NLL seen, and the test NLL at that step (early stopping)
    best_step: int | None = None
    best_test_nll: float | None = None

    @property
    def test_ppl(self) -> float:
        return math.exp(self.test_nll)

    @property
    def best_test_ppl(self) -> float:
        return math.exp(self.best_test_nll)


def gpt2_config(layers: int, width: int, heads: int, seq_len: int, vocab_size: int, dropout: float = 0.0) -> GPT2Config:
    """A GPT-2 config (feed-forward width 4x, tied embeddings), one `dropout` rate on embeddings, residuals and
    attention (0 by default)."""
    return GPT2Config(vocab_size=vocab_size, n_positions=seq_len, n_embd=width, n_layer=layers, n_head=heads,
                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)


def build_model(spec: VariantSpec, heads: int, seq_len: int, vocab_size: int, seed: int,
                dropout: float = 0.0) -> GPT2LMHeadModel:
    """The variant's model, freshly initialised from `seed` (LORS variants lorsified with the paper's init)."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(gpt2_config(spec.layers, spec.width, heads, seq_len, vocab_size, dropout))
    if spec.lorsify_kwargs is not None:
        lorsify(model, init="scratch", **spec.lorsify_kwargs)
    return model


def stack_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the layer stack as the model is now (shared weights counted once)."""
    return parameter_report(model).stacks_total.lors


def dense_stack_estimate(layers: int, width: int) -> int:
    """Parameters of a dense GPT-2 block stack: per block 12 d^2 (projections) + 9 d (biases) + 4 d (LayerNorms).

    Example:
        >>> dense_stack_estimate(8, 128)  # the long preset's dense stack, as parameter_report counts it
        1586176
    """
    return layers * (12 * width * width + 13 * width)


def match_shallow_dense(target: int, layers: int, width: int, heads: int) -> tuple[int, int]:
    """Fewer layers (and the width, a multiple of `heads`) whose dense stack best matches `target` parameters.

    Among 1..layers-1 layers, each with its best-matching width, the one whose width stays closest to
    `width` wins (the baseline should differ from the dense model mostly in depth).

    Example:
        >>> match_shallow_dense(2_516_992, layers=8, width=256, heads=4)
        (3, 264)
    """
    best: tuple[float, int, int] | None = None
    for n in range(1, layers):
        ideal = math.sqrt(target / (12 * n))
        candidates = {max(heads, heads * round(ideal / heads) + k * heads) for k in (-1, 0, 1)}
        d = min(candidates, key=lambda d: abs(dense_stack_estimate(n, d) - target))
        score = abs(d - width) / width + abs(dense_stack_estimate(n, d) - target) / target
        if best is None or score < best[0]:
            best = (score, n, d)
    assert best is not None
    return best[1], best[2]


def variant_specs(args: argparse.Namespace, vocab_size: int) -> list[VariantSpec]:
    """The variants in ``args.variants``; the shallow baseline is sized from the LORS-60 model's stack parameter
    count (whether or not LORS-60 is trained)."""
    base = {"layers": args.layers, "width": args.d_model}
    specs = [
        VariantSpec("dense", **base, description="dense GPT-2"),
        VariantSpec("lors-60", **base, lorsify_kwargs={"target_reduction": 0.6},
                    description="LORS, target_reduction=0.6"),
        VariantSpec("lors-70", **base, lorsify_kwargs={"target_reduction": 0.7},
                    description="LORS, target_reduction=0.7"),
        VariantSpec("shared", **base, lorsify_kwargs={"rank": 0}, description="full sharing (rank 0, ALBERT-style)"),
    ]
    lors60 = build_model(specs[1], args.heads, args.seq_len, vocab_size, seed=0)
    target = stack_parameter_count(lors60)
    layers, width = match_shallow_dense(target, args.layers, args.d_model, args.heads)
    specs.append(VariantSpec("shallow", layers, width, description=f"dense, {layers} layers x {width}"))
    return [spec for spec in specs if spec.name in args.variants]


# ------------------------------------------------------------------------------------- train / eval


def lr_at(step: int, steps: int, warmup: int, peak: float, final_fraction: float = 0.1) -> float:
    """Linear warmup to `peak`, then cosine decay to ``final_fraction * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, b_lr_ratio: float = 1.0,
                   stack_lr_ratio: float = 1.0) -> torch.optim.AdamW:
    """AdamW; matrices (ndim >= 2: shared weights, LORS factors, dense weights, embeddings) decay, the rest not.

    A model with private LORS factors gets `lors_parameter_groups`: its shared weights and ``lors_A`` at
    ``stack_lr_ratio`` times the learning rate, its ``lors_B`` at ``stack_lr_ratio * b_lr_ratio`` times. The
    dense, shallow and fully shared (no ``lors_B``) models keep one learning rate. Every group records its
    ``lr_scale`` (its learning rate over `lr`) for the schedule.
    """
    if any(name.endswith("lors_B") and p.numel() for name, p in model.named_parameters()):
        groups = lors_parameter_groups(model, lr, weight_decay, b_lr_ratio, stack_lr_ratio)
    else:
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                  {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    for group in groups:
        group["lr_scale"] = group["lr"] / lr
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """bf16 autocast context on `device` (a no-op context when `bf16` is False)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def evaluate_nll(model: GPT2LMHeadModel, ids: torch.Tensor, seq_len: int, max_tokens: int, batch_size: int = 32,
                 bf16: bool = False) -> float:
    """Mean next-character NLL over consecutive non-overlapping windows of `ids` (first `max_tokens` targets)."""
    model.eval()
    device = next(model.parameters()).device
    count = min(max_tokens, len(ids) - 1) // seq_len
    starts = torch.arange(count) * seq_len
    total, tokens = 0.0, 0
    for i in range(0, count, batch_size):
        window = ids[starts[i : i + batch_size, None] + torch.arange(seq_len + 1)].to(device)
        with autocast(device, bf16):
            logits = model(input_ids=window[:, :-1]).logits.float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1), reduction="sum").item()
        tokens += window[:, 1:].numel()
    model.train()
    return total / tokens


def training_ids(data: CharData, args: argparse.Namespace) -> torch.Tensor:
    """The characters training samples from: the whole train split, or its first ``--train-chars``."""
    return data.train[:args.train_chars] if args.train_chars else data.train


def validation_tokens(args: argparse.Namespace) -> int:
    """Characters scored on the validation split: a quarter of ``--eval-tokens`` (the test split gets them all),
    at least one window."""
    return max(args.seq_len, args.eval_tokens // 4)


def train_variant(spec: VariantSpec, seed: int, data: CharData, args: argparse.Namespace) -> RunResult:
    """Train one variant from scratch for ``args.steps`` steps and score it on validation and test."""
    device = torch.device(args.device)
    model = build_model(spec, args.heads, args.seq_len, data.vocab_size, seed, args.dropout).to(device)
    model.train()
    rank = "-"
    if spec.lorsify_kwargs is not None:
        rank = ",".join(str(r) for r in get_lors_config(model).private_ranks() or [0])
    optimizer = make_optimizer(model, args.lr, args.weight_decay, args.b_lr_ratio, args.stack_lr_ratio)
    generator = torch.Generator().manual_seed(1000 + seed)  # the same batches for every variant of a seed
    warmup = max(1, int(args.warmup_fraction * args.steps))
    losses: list[torch.Tensor] = []  # kept on the device: no sync per step
    train_ids = training_ids(data, args)

    def validation() -> float:
        return evaluate_nll(model, data.validation, args.seq_len, validation_tokens(args), bf16=args.bf16)

    def test() -> float:
        return evaluate_nll(model, data.test, args.seq_len, args.eval_tokens, bf16=args.bf16)

    best: tuple[int, float, float] | None = None  # (step, validation NLL, test NLL) at the best validation NLL
    validation_nll = None  # with --eval-every: the last periodic score, which is the final step's
    eval_seconds = 0.0  # spent in the periodic evaluations, left out of the training time
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, warmup, args.lr) * group["lr_scale"]
        batch = sample_batch(train_ids, args.batch_size, args.seq_len, generator).to(device, non_blocking=True)
        with autocast(device, args.bf16):
            logits = model(input_ids=batch[:, :-1]).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            eval_start = time.perf_counter()
            validation_nll = validation()
            if best is None or validation_nll < best[1]:
                best = (step + 1, validation_nll, test())
            eval_seconds += time.perf_counter() - eval_start
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            recent = torch.stack(losses[-args.log_every:]).mean().item()
            print(f"  [{spec.name} seed {seed}] step {step + 1}/{args.steps} loss {recent:.4f} "
                  f"({elapsed:.0f} s)", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - start - eval_seconds
    loss_values = torch.stack(losses).float().cpu().tolist()
    # the periodic scoring ran at the last step too: its figures are the final ones, not scored again
    test_nll = best[2] if best and best[0] == args.steps else test()
    validation_nll = validation() if validation_nll is None else validation_nll
    return RunResult(spec.name, seed, stack_parameter_count(model), sum(p.numel() for p in model.parameters()), rank,
                     test_nll, validation_nll, train_seconds, loss_values,
                     *((best[0], best[2]) if best else (None, None)))


def _report(result: RunResult) -> RunResult:
    print(f"{result.variant} seed {result.seed}: test ppl {result.test_ppl:.3f}, "
          f"val ppl {math.exp(result.validation_nll):.3f}, train {result.train_seconds:.0f} s", flush=True)
    return result


def _train_in_worker(spec: VariantSpec, seed: int, args: argparse.Namespace) -> RunResult:
    """One run in a worker process (it loads the data itself: cheaper than sending 36 MB of ids)."""
    setup_run(args.threads)
    return train_variant(spec, seed, load_char_data(), args)


def train_all(specs: list[VariantSpec], data: CharData, args: argparse.Namespace) -> list[RunResult]:
    """Every variant for every seed, in (seed, variant) order; ``args.jobs`` runs at once in worker processes.

    A run depends only on its variant, seed and arguments (its batches come from its own generator), so
    running several at once changes the wall time and the per-run times, not the figures.
    """
    runs = [(spec, seed) for seed in args.seeds for spec in specs]
    if args.jobs <= 1:
        return [_report(train_variant(spec, seed, data, args)) for spec, seed in runs]
    results = run_in_processes(_train_in_worker, [(spec, seed, args) for spec, seed in runs], args.jobs)
    return [_report(result) for result in results]


# ------------------------------------------------------------------------------------------- report


def summarize(values: list[float]) -> tuple[float, float]:
    """Mean and half-range (the spread reported as ``mean ± half-range``)."""
    return float(np.mean(values)), (max(values) - min(values)) / 2


def save_plots(results: list[RunResult], specs: list[VariantSpec], out_dir: Path, smoothing: int,
               prefix: str = SECTION) -> list[str]:
    """Training-loss curves and test perplexity against stack parameters; returns the PNG file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for spec in specs:
        runs = [r for r in results if r.variant == spec.name]
        curve = np.mean([r.losses for r in runs], axis=0)
        k = max(1, min(smoothing, len(curve)))
        smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(curve) + 1), smooth, label=spec.name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (nats/char, mean over seeds, {smoothing}-step average)")
    ax.set_title("GPT-2 char model on Shakespeare, from scratch")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    names.append(f"{prefix}_loss.png")
    fig.savefig(out_dir / names[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for spec in specs:
        runs = [r for r in results if r.variant == spec.name]
        mean, spread = summarize([r.test_ppl for r in runs])
        ax.errorbar([runs[0].stack_params / 1e6], [mean], yerr=[spread], fmt="o", capsize=4, label=spec.name)
    ax.set_xlabel("stack parameters (millions)")
    ax.set_ylabel("test perplexity (per character)")
    ax.set_title("Held-out perplexity against layer-stack size")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    names.append(f"{prefix}_ppl.png")
    fig.savefig(out_dir / names[-1], dpi=110)
    plt.close(fig)
    return names


def lors_learning_rates(args: argparse.Namespace) -> str:
    """How the LORS models' learning rates differ from the peak lr, as a clause of the setup sentence."""
    if args.b_lr_ratio == 1 and args.stack_lr_ratio == 1:
        return "(LORS factors included), "
    stack = args.stack_lr_ratio
    return (f"except in the LORS models (`lors_hf.lors_parameter_groups`): shared weights and `lors_A` at {stack:g}x, "
            f"`lors_B` at {stack * args.b_lr_ratio:g}x; the dense, shallow and fully shared models use one lr; ")


def target_lines(ppl: dict[str, float]) -> list[str]:
    """The issue's targets for each LORS variant in `ppl` (test perplexity by variant): within 2% of dense,
    better than the fully shared and the shallow models."""
    lines = []
    for name in ("lors-60", "lors-70"):
        if name not in ppl:
            continue
        gap = ppl[name] / ppl["dense"] - 1
        lines.append(f"- `{name}` within 2% of dense perplexity: {'HIT' if gap <= 0.02 else 'MISSED'} ({gap:+.2%}).")
        for baseline in ("shared", "shallow"):
            if baseline not in ppl:
                continue
            better = ppl[name] < ppl[baseline]
            lines.append(f"- `{name}` better than `{baseline}`: {'HIT' if better else 'MISSED'} "
                         f"({ppl[name]:.3f} vs {ppl[baseline]:.3f}).")
    return lines


def render_markdown(results: list[RunResult], specs: list[VariantSpec], args: argparse.Namespace, data: CharData,
                    plots: list[str], command: str, wall_seconds: float) -> str:
    """The ``bench_scratch`` section of RESULTS.md: setup, command, table, targets, plots."""
    tokens = args.steps * args.batch_size * args.seq_len
    train_chars = len(training_ids(data, args))
    training_text = (f"the first {train_chars:,} characters of the train split" if train_chars < len(data.train)
                     else "the train split")
    by_variant = {spec.name: [r for r in results if r.variant == spec.name] for spec in specs}
    dense_stack = by_variant["dense"][0].stack_params
    dense_ppl, _ = summarize([r.test_ppl for r in by_variant["dense"]])
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = [
        "## From scratch: GPT-2 character model on Shakespeare (`scripts/bench_scratch.py`)"
        + (f", preset `{args.preset}`" if args.preset != "default" else "")
        + (f", peak lr {args.lr:g}" if args.lr != DEFAULT_LR else "")
        + (f", `lors_B` at {args.b_lr_ratio:g}x the learning rate" if args.b_lr_ratio != 1 and args.stack_lr_ratio == 1
           else "")
        + (f", LORS stack (shared weights, `lors_A`) at {args.stack_lr_ratio:g}x the learning rate and `lors_B` at "
           f"{args.b_lr_ratio:g}x that" if args.stack_lr_ratio != 1 else "")
        + (f", {args.steps} steps" if args.own_steps else "")
        + (f", trained on the first {train_chars:,} characters" if train_chars < len(data.train) else "")
        + (f", dropout {args.dropout:g}" if args.dropout else "")
        + (f", variants {', '.join(args.variants)} only" if len(args.variants) < len(VARIANT_NAMES) else "")
        + (" on GPU" if args.device != "cpu" else ""),
        "",
        f"Machine: {machine_description()}; device {args.device}{', bf16 autocast' if args.bf16 else ', fp32'}"
        + (f", {args.threads} torch CPU thread(s) per run, {args.jobs} run(s) at once (the CPU is shared with other "
           "jobs: times are noisy)" if args.device == "cpu" else "")
        + f". Total wall time {wall_seconds / 60:.1f} min.",
        "",
        "```",
        command,
        "```",
        "",
        f"Setup: GPT-2 decoder, {args.layers} layers x width {args.d_model}, {args.heads} heads, context {args.seq_len}, "
        f"feed-forward 4x, {f'dropout {args.dropout:g} (embeddings, residuals, attention)' if args.dropout else 'no dropout'}, "
        f"tied embeddings. Character-level vocabulary built from the whole training split "
        f"({len(data.vocabulary)} characters + `<unk>`). Training data: {training_text} of "
        "`lors_hf.assets.shakespeare_splits()` (38 plays), random windows; the same batches for every variant of a seed. "
        f"Token budget per run: {args.steps} steps x {args.batch_size} x {args.seq_len} = {tokens:,} tokens "
        f"({tokens / train_chars:.2f} epochs of {train_chars:,} training characters). AdamW "
        f"(betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak lr {args.lr} for every parameter "
        + lors_learning_rates(args)
        + f"{args.warmup_fraction:.0%} linear warmup then cosine to 10%, gradient clipping 1.0. "
        f"Perplexity = exp(mean NLL per character) over the first {args.eval_tokens:,} characters of the test split "
        f"and the first {validation_tokens(args):,} of the validation split, in non-overlapping windows of "
        f"{args.seq_len}. Train ppl = exp(mean training loss over the last 5% of steps, "
        f"{'dropout on, ' if args.dropout else ''}on the training batches): its gap to val/test ppl shows overfitting. "
        f"Seeds: {seeds}; spread = half the range over seeds.",
        "",
        "| variant | layers x width | private rank | stack params | vs dense stack | model params | "
        "test ppl (mean ± spread) | per seed | vs dense | val ppl | train ppl | "
        + ("test ppl at best val (step per seed) | " if args.eval_every else "") + "train time / run |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|" + ("---:|" if args.eval_every else "") + "---:|",
    ]
    for spec in specs:
        runs = by_variant[spec.name]
        mean, spread = summarize([r.test_ppl for r in runs])
        val_mean, _ = summarize([math.exp(r.validation_nll) for r in runs])
        per_seed = " / ".join(f"{r.test_ppl:.3f}" for r in runs)
        minutes = np.mean([r.train_seconds for r in runs]) / 60
        train_ppl = np.mean([math.exp(np.mean(r.losses[-max(1, len(r.losses) // 20):])) for r in runs])
        lines.append(
            f"| {spec.name} ({spec.description}) | {spec.layers} x {spec.width} | {runs[0].rank} | "
            f"{runs[0].stack_params:,} | {runs[0].stack_params / dense_stack - 1:+.1%} | {runs[0].model_params:,} | "
            f"{mean:.3f} ± {spread:.3f} | {per_seed} | {mean / dense_ppl - 1:+.2%} | {val_mean:.3f} | {train_ppl:.3f} | "
            + (f"{np.mean([r.best_test_ppl for r in runs]):.3f} "
               f"({' / '.join(str(r.best_step) for r in runs)}) | " if args.eval_every else "")
            + f"{minutes:.1f} min |"
        )
    lines.append("")
    if "shallow" in by_variant and "lors-60" in by_variant:
        shallow, lors60 = by_variant["shallow"][0], by_variant["lors-60"][0]
        lines += [f"Equal-parameter baseline: `shallow` has {shallow.stack_params:,} stack parameters against "
                  f"{lors60.stack_params:,} for `lors-60` ({shallow.stack_params / lors60.stack_params - 1:+.1%}).", ""]
    lines += ["Targets (computed from the table):", ""]
    lines += target_lines({name: summarize([r.test_ppl for r in runs])[0] for name, runs in by_variant.items()})
    if args.eval_every:
        lines += ["", "The same targets on the test perplexity at each run's best validation step (early stopping, "
                  f"validation scored every {args.eval_every} steps):", ""]
        lines += target_lines({name: float(np.mean([r.best_test_ppl for r in runs]))
                               for name, runs in by_variant.items()})
    lines += ["", *[f"![{name}]({name})" for name in plots]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="model shape and token budget (explicit flags override them)")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", choices=VARIANT_NAMES, default=list(VARIANT_NAMES),
                        help="variants to train (dense is always trained: the table compares with it); a subset "
                             "writes its own section, suffixed with their names")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help="peak learning rate (another value writes a section suffixed _lr<value>)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--b-lr-ratio", type=float, default=1.0,
                        help="learning rate of the LORS factors lors_B over the peak lr (1: the paper's single lr; a "
                             "run with another ratio writes its own section, suffixed _b<ratio>)")
    parser.add_argument("--stack-lr-ratio", type=float, default=1.0,
                        help="learning rate of the LORS models' shared weights and lors_A over the peak lr (lors_B "
                             "gets this times --b-lr-ratio; other ratios write a section suffixed _s<ratio>)")
    parser.add_argument("--train-chars", type=int, default=None,
                        help="train on the first N characters of the train split only (a data-limited, multi-epoch "
                             "run; writes a section suffixed _chars<N>)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout on embeddings, residuals and attention, every variant (section suffix _drop<p>)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="score validation (and test) every N steps and also report the test perplexity at each "
                             "run's best validation step (early stopping; 0: only at the end)")
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument("--eval-tokens", type=int, default=32_768, help="characters scored per held-out split")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared 2-core box two OpenMP threads ran 3.7x slower)")
    parser.add_argument("--jobs", type=int,
                        help="runs trained at once, one process each (CPU; 2 on a 2-core box with --threads 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (on cuda)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run in seconds (for tests)")
    parser.add_argument("--results-file", default=str(RESULTS_FILE))
    args = parser.parse_args(argv)
    refuse_smoke_into_docs(parser, args)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = [name for name in VARIANT_NAMES if name in {"dense", *args.variants}]
    args.own_steps = args.steps != PRESETS[args.preset]["steps"]  # another token budget: its own section
    if args.smoke:
        args.layers, args.d_model, args.heads, args.seq_len = 6, 32, 2, 32
        args.steps, args.batch_size, args.eval_tokens, args.log_every = 4, 4, 512, 2
    if args.train_chars is not None and args.train_chars < 2 * (args.seq_len + 1):
        parser.error(f"--train-chars {args.train_chars} is too short for windows of {args.seq_len + 1} characters: "
                     f"give at least {2 * (args.seq_len + 1)}.")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}.")
    if args.eval_every < 0:
        parser.error(f"--eval-every must be >= 0 (0: score only at the end), got {args.eval_every}.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_run(args.threads)
    command = "HF_HUB_OFFLINE=1 python scripts/bench_scratch.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    wall = time.perf_counter()
    data = load_char_data()
    specs = variant_specs(args, data.vocab_size)
    for spec in specs:
        model = build_model(spec, args.heads, args.seq_len, data.vocab_size, seed=0)
        print(f"{spec.name:8s} {spec.layers} layers x {spec.width}: stack {stack_parameter_count(model):,} params, "
              f"model {sum(p.numel() for p in model.parameters()):,}", flush=True)
    results = train_all(specs, data, args)
    results_file = Path(args.results_file)
    section = SECTION + (f"_{args.preset}" if args.preset != "default" else "")
    section += f"_steps{args.steps}" if args.own_steps else ""
    section += f"_lr{args.lr:g}" if args.lr != DEFAULT_LR else ""
    section += f"_b{args.b_lr_ratio:g}" if args.b_lr_ratio != 1 else ""
    section += f"_s{args.stack_lr_ratio:g}" if args.stack_lr_ratio != 1 else ""
    section += f"_chars{args.train_chars}" if args.train_chars else ""
    section += f"_drop{args.dropout:g}" if args.dropout else ""
    section += "_" + "_".join(args.variants) if len(args.variants) < len(VARIANT_NAMES) else ""
    section = device_section(section, args.device)
    plots = save_plots(results, specs, results_file.parent, smoothing=max(1, args.steps // 20),
                       prefix=section)
    markdown = render_markdown(results, specs, args, data, plots, command.strip(), time.perf_counter() - wall)
    update_section(section, markdown, results_file)
    print(markdown)


if __name__ == "__main__":
    main()
