"""Speed and memory of a LORS model against the same dense model, measured in one run.

A GPT-2-style model (default 8 layers, d=512) is timed dense and lorsified (default: 60% fewer stack
parameters) on
- a training step (forward + backward + AdamW step) with batch x seq >= 2k tokens, and its peak memory;
- a single-token decode step with a KV cache (batch 1, after a prefill).
Dense and LORS are measured alternately, round after round, and the medians are compared, so a
noisy machine hits both alike. Targets (issue #2): train <= 1.05x dense, decode <= 1.10x dense.

    python scripts/bench_speed.py                       # CPU, writes the bench_speed section of docs/RESULTS.md
    python scripts/bench_speed.py --device cuda --bf16  # GPU, bf16 autocast
    python scripts/bench_speed.py --smoke --results-file /tmp/r.md
    python scripts/bench_speed.py --memory-only --bf16  # CPU: training memory only, under bf16 autocast
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_results import RESULTS_FILE, machine_description, refuse_smoke_into_docs, update_section  # noqa: E402

from lors_hf import LorsConfig, lorsify, parameter_report  # noqa: E402
from lors_hf.layer import set_weight_cache  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=args.d_model, n_head=args.heads, n_positions=args.seq_len + 64,
                        vocab_size=args.vocab, bos_token_id=0, eos_token_id=0)
    dense = GPT2LMHeadModel(config).to(args.device)  # converted where it runs: a GPU does the SVDs in seconds
    lors = lorsify(copy.deepcopy(dense), LorsConfig(target_reduction=args.reduction, init="svd"))
    return {"dense": dense, "lors": lors}


def with_cached_variant(models: dict) -> dict:
    """Adds "lors_cached": a copy of the LORS model with the inference weight cache on (decode only).

    A copy, not the same object with the cache switched on and off round by round: `set_weight_cache` drops
    every cached weight, so each timed round of the cached model rebuilt all of them (``W_shared + B A`` per
    projection) inside its timing. The copy builds its cache once, in the untimed prefill.
    """
    return {**models, "lors_cached": set_weight_cache(copy.deepcopy(models["lors"]), True)}


def time_train_steps(models: dict, args: argparse.Namespace) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=gen).to(args.device)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16)
    times: dict[str, list[float]] = {name: [] for name in models}
    peak: dict[str, float] = {}

    def step(name: str) -> float:
        model, optimizer = models[name], optimizers[name]
        model.train()
        sync(args.device)
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args.device)
        return time.perf_counter() - start

    for name in models:  # warm-up (and peak memory on GPU, one step each from a clean slate)
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        for _ in range(args.warmup):
            step(name)
        if args.device == "cuda":
            peak[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    for _ in range(args.rounds):
        for name in models:
            times[name].append(step(name))
    return {n: statistics.median(t) for n, t in times.items()}, peak


@torch.no_grad()
def time_decode_steps(models: dict, args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, args.vocab, (1, args.prefill), generator=gen).to(args.device)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16)
    state = {}
    for name, model in models.items():
        model.eval()
        with autocast:
            out = model(input_ids=prompt, use_cache=True)
        state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            cache, token = copy.deepcopy(state[name][0]), state[name][1]  # same context length every round
            sync(args.device)
            start = time.perf_counter()
            for _ in range(args.decode_steps):
                with autocast:
                    out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync(args.device)
            times[name].append((time.perf_counter() - start) / args.decode_steps)
    return {n: statistics.median(t) for n, t in times.items()}


def cpu_peak_memory(args: argparse.Namespace) -> dict:
    """Per variant, in a fresh subprocess each (CPU has no allocator stats): `memory_probe`'s peak RSS growth of
    training steps (``peak_mib``), peak of live tensors (``tensor_peak_mib``) and parameter count."""
    import subprocess

    peaks: dict[str, dict[str, float]] = {}
    for name in ("dense", "lors"):
        cmd = [sys.executable, __file__, "--_memory-probe", name, "--layers", str(args.layers), "--d-model",
               str(args.d_model), "--heads", str(args.heads), "--batch-size", str(args.batch_size), "--seq-len",
               str(args.seq_len), "--reduction", str(args.reduction), "--vocab", str(args.vocab)] + (
                   ["--bf16"] if args.bf16 else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        peaks[name] = json.loads(out.strip().splitlines()[-1])
    return peaks


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(args: argparse.Namespace) -> None:
    """Peak RSS above the resting model during 2 training steps (Linux: peak reset via clear_refs), then the
    peak of live tensors during a third step (`tensor_peak_mib`)."""
    models = build_models(args)
    model = models.pop(args._memory_probe)
    del models
    batch = torch.randint(0, args.vocab, (args.batch_size, args.seq_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _rss_mib("VmRSS")
    for _ in range(2):
        train_step()
    rss_peak = _rss_mib("VmHWM") - before
    figures = {"peak_mib": rss_peak, "tensor_peak_mib": tensor_peak_mib(train_step),
               "parameters": sum(p.numel() for p in model.parameters())}
    if args._memory_probe == "lors":
        stacks = parameter_report(model).stacks_total
        figures["stack_params"] = {"dense": stacks.dense, "lors": stacks.lors, "reduction": stacks.reduction}
    print(json.dumps(figures))


def tensor_peak_mib(step) -> float:
    """The largest total of live CPU tensors during `step()` (weights, gradients, AdamW state, activations,
    temporaries), from torch.profiler's memory timeline: what the model holds, whatever the allocator keeps.

    RSS is the allocator's view: glibc keeps freed blocks mapped, so the peak RSS growth of the default 8 x 512
    model came out at 1981 MiB dense against 1984 MiB for LORS (section bench_speed_cpu of docs/RESULTS.md, before
    this measure), whose weights, gradients and AdamW state take 15.1M x 16 bytes less."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _times, sizes = json.loads(path.read_text())  # per event: bytes of each category of tensor
    return max(sum(row) for row in sizes) / 2**20


def memory_only(args: argparse.Namespace) -> None:
    """`--memory-only`: the CPU memory probes of dense and LORS, nothing timed."""
    probes = cpu_peak_memory(args)
    stacks = probes["lors"]["stack_params"]
    figures = {"model": f"GPT-2 {args.layers} layers, d={args.d_model}, vocab {args.vocab}", "probes": probes,
               "rss_ratio": probes["lors"]["peak_mib"] / probes["dense"]["peak_mib"],
               "tensor_ratio": probes["lors"]["tensor_peak_mib"] / probes["dense"]["tensor_peak_mib"],
               "device": machine_description(), "bf16": args.bf16}
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    command = "python scripts/bench_speed.py " + " ".join(sys.argv[1:])
    dense, lors = probes["dense"], probes["lors"]
    markdown = f"""## Training memory (`bench_speed --memory-only`, {'bf16 autocast' if args.bf16 else 'fp32'}, cpu)

`{command.strip()}` on {figures['device']}

{figures['model']}; stacks {stacks['dense']:,} -> {stacks['lors']:,} parameters ({stacks['reduction']:.1%} fewer);
{args.batch_size * args.seq_len} tokens per training step (AdamW).

| measure | dense | LORS | LORS / dense |
|---|---|---|---|
| peak RSS growth of 2 steps in a fresh process, MiB | {dense['peak_mib']:.0f} | {lors['peak_mib']:.0f} | {figures['rss_ratio']:.3f} |
| peak of live tensors in a third step (torch.profiler), MiB | {dense['tensor_peak_mib']:.0f} | {lors['tensor_peak_mib']:.0f} | {figures['tensor_ratio']:.3f} |
"""
    section = "bench_speed_memory_cpu" + ("_bf16" if args.bf16 else "") + (f"_{args.tag}" if args.tag else "")
    path = update_section(section, markdown, args.results_file)
    print(f"wrote section {section} of {path}")


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--reduction", type=float, default=0.6)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch default)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; for CI")
    parser.add_argument("--results-file", default=str(RESULTS_FILE))
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--tag", default="", help="suffix of the results section (several sizes side by side)")
    parser.add_argument("--memory-only", action="store_true",
                        help="CPU: only the memory of a training step (no timing; with --bf16 under bf16 autocast), "
                             "section bench_speed_memory_cpu[_bf16][_<tag>]")
    parser.add_argument("--_memory-probe", dest="_memory_probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    refuse_smoke_into_docs(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.layers, args.d_model, args.heads, args.vocab, args.batch_size, args.seq_len = 4, 64, 2, 256, 2, 64
        args.prefill, args.decode_steps, args.rounds, args.warmup = 8, 2, 2, 1
    if args._memory_probe:
        memory_probe(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    if args.memory_only:
        if args.device != "cpu":
            parser.error("--memory-only measures on the CPU (a GPU run measures memory with the timings)")
        memory_only(args)
        return
    tokens = args.batch_size * args.seq_len
    models = build_models(args)
    report = parameter_report(models["lors"]).stacks_total
    train, peak = time_train_steps(models, args)
    decode = time_decode_steps(with_cached_variant(models), args)
    tensor_peak = None
    if args.device == "cpu" and not args.smoke:
        probes = cpu_peak_memory(args)
        peak = {name: probe["peak_mib"] for name, probe in probes.items()}
        tensor_peak = {name: probe["tensor_peak_mib"] for name, probe in probes.items()}
    peak = {name: peak.get(name, 0.0) for name in models}
    figures = {
        "model": f"GPT-2 {args.layers} layers, d={args.d_model}, vocab {args.vocab}",
        "stack_params_dense": report.dense, "stack_params_lors": report.lors,
        "stack_reduction": report.reduction, "tokens_per_train_step": tokens,
        "train_step_s": train, "train_ratio": train["lors"] / train["dense"],
        "decode_step_s": decode, "decode_ratio": decode["lors"] / decode["dense"],
        "decode_ratio_cached": decode["lors_cached"] / decode["dense"],
        "peak_train_memory_mib": peak, "memory_ratio": peak["lors"] / peak["dense"] if peak.get("dense") else None,
        "peak_tensor_memory_mib": tensor_peak,
        "tensor_memory_ratio": tensor_peak["lors"] / tensor_peak["dense"] if tensor_peak else None,
        "device": machine_description(), "bf16": args.bf16,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    command = "python scripts/bench_speed.py " + " ".join(sys.argv[1:])
    mem_kind = "peak CUDA memory allocated" if args.device == "cuda" else "peak RSS growth of 2 steps in a fresh process"
    markdown = f"""## Speed and memory (`bench_speed`, {'bf16 autocast' if args.bf16 else 'fp32'}, {args.device})

`{command.strip()}` on {figures['device']}

{figures['model']}; stacks {report.dense:,} -> {report.lors:,} parameters ({report.reduction:.1%} fewer).
Medians of {args.rounds} alternating rounds.

| measure | dense | LORS | LORS / dense | target |
|---|---|---|---|---|
| training step ({tokens} tokens), ms | {train['dense']*1e3:.1f} | {train['lors']*1e3:.1f} | {figures['train_ratio']:.3f} | <= 1.05 |
| decode step (1 token, KV cache), ms | {decode['dense']*1e3:.2f} | {decode['lors']*1e3:.2f} | {figures['decode_ratio']:.3f} | <= 1.10 |
| decode step, LORS with `set_weight_cache` (dense-size weights), ms | {decode['dense']*1e3:.2f} | {decode['lors_cached']*1e3:.2f} | {figures['decode_ratio_cached']:.3f} | - |
| training memory ({mem_kind}), MiB | {peak['dense']:.0f} | {peak['lors']:.0f} | {_ratio(figures['memory_ratio'])} | - |
"""
    if tensor_peak:
        markdown += (f"| training memory (peak of live tensors in a third step: weights, gradients, AdamW state, "
                     f"activations; torch.profiler), MiB | {tensor_peak['dense']:.0f} | {tensor_peak['lors']:.0f} | "
                     f"{_ratio(figures['tensor_memory_ratio'])} | - |\n")
    section = "bench_speed_" + args.device + ("_bf16" if args.bf16 else "") + (f"_{args.tag}" if args.tag else "")
    path = update_section(section, markdown, args.results_file)
    print(f"wrote section {section} of {path}")


if __name__ == "__main__":
    main()
