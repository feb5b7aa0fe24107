#!/usr/bin/env python
"""The paper's kind of model: DETR trained from scratch on a Fashion-MNIST detection set, dense against LORS.

Both variants start from the same random DETR (ResNet backbone from a small ``ResNetConfig`` with trainable
BatchNorm, no timm, no download). The LORS variant shares its encoder's and its decoder's projections
across layers with ``lorsify`` (``init="scratch"``, the paper's init), each stack at the largest uniform
private rank that removes at least 70% of its parameters. Both are trained with the same batches,
optimiser and schedule (each at its own peak learning rate), then scored by COCO mAP
(``pycocotools.COCOeval``) on the validation images and on held-out test images: the learning rates were
chosen by validation AP, so the test split is the unbiased check.

Data: ``lors_hf.assets.make_detection_set`` pastes 1-4 real Fashion-MNIST items (10 classes) on black
128x128 canvases and writes COCO json + PNGs for train, val and test (cached under ``--data-dir``).
Training uses a plain tensor pipeline (random horizontal flips), and DETR's own loss (Hungarian matching,
auxiliary decoder losses).

Usage:
    HF_HUB_OFFLINE=1 python scripts/bench_detr.py                      # CPU default (~30 min, 2 runs at once)
    HF_HUB_OFFLINE=1 python scripts/bench_detr.py --preset gpu --device cuda --bf16   # ~8.5 min on an H200
    HF_HUB_OFFLINE=1 python scripts/bench_detr.py --lr 1.5e-4 --variants dense        # one model, own section
    HF_HUB_OFFLINE=1 python scripts/bench_detr.py --lors-lr 4e-4 --seed 1             # LORS at another lr
    HF_HUB_OFFLINE=1 python scripts/bench_detr.py --smoke --results-file /tmp/r.md    # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
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
from bench_results import (
    RESULTS_FILE,
    device_section,
    machine_description,
    refuse_smoke_into_docs,
    run_in_processes,
    setup_run,
    update_section,
)
from run_detection import train_backbone_from_scratch
from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

from lors_hf import LorsConfig, lorsify, parameter_report
from lors_hf.assets import FASHION_MNIST_CLASSES, make_detection_set
from lors_hf.discovery import plan_ranks

SECTION = "bench_detr"  # "bench_detr_gpu" for a --device cuda run, so CPU and GPU figures coexist
STACKS = ("encoder", "decoder")
VARIANTS = ("dense", "lors")
BUDGET_SUFFIXES = (("steps", "steps"), ("batch_size", "batch"), ("num_train", "train"), ("num_val", "val"),
                   ("num_test", "test"))
"""(argument, section suffix) of the budget and data sizes: a value other than the preset's names its own section."""

PRESETS: dict[str, dict] = {
    # 2 CPU cores, both variants at once with 1 thread each: ~0.27 s per step of 16 images -> about 30 minutes.
    # Peak lrs: each model's best on seed 0 by val AP (dense collapsed at 3e-4; docs/RESULTS.md has the sweep).
    "cpu": {"steps": 6000, "batch_size": 16, "num_train": 10000, "num_val": 500, "num_test": 1000,
            "lrs": {"dense": 2.2e-4, "lors": 3e-4}, "jobs": 2},
    # One H200, bf16, both variants at once: 0.264 s (dense) and 0.278 s (LORS) per step of 64 in a 400-step
    # timing probe (GPU ~90% busy: two at once are no faster than one after the other), data ~40 s -> about
    # 8.5 minutes, the most that fits one 15-minute device lease. Against the CPU preset: the same 96k images
    # seen, in batches 4x larger, from 2x the training images; 2x the validation images; the CPU preset's lrs.
    "gpu": {"steps": 1500, "batch_size": 64, "num_train": 20000, "num_val": 1000, "num_test": 1000,
            "lrs": {"dense": 2.2e-4, "lors": 3e-4}, "jobs": 2},
    "smoke": {"steps": 3, "batch_size": 4, "num_train": 16, "num_val": 8, "num_test": 8,
              "lrs": {"dense": 3e-4, "lors": 3e-4}, "jobs": 1},
}


# ----------------------------------------------------------------------------------------------- data


@dataclass
class DetectionTensors:
    """A COCO split as tensors: grayscale images, padded normalised ``(cx, cy, w, h)`` boxes and classes."""

    images: torch.Tensor  # (N, H, W) uint8; the set's RGB PNGs are gray, channels are restored at batch time
    boxes: torch.Tensor  # (N, max_objects, 4) float, zero padded
    classes: torch.Tensor  # (N, max_objects) long
    counts: list[int]
    image_ids: list[int]
    annotation_file: str

    def to(self, device: torch.device) -> DetectionTensors:
        return DetectionTensors(self.images.to(device), self.boxes.to(device), self.classes.to(device), self.counts,
                                self.image_ids, self.annotation_file)


def load_split(annotation_file: str, image_dir: str) -> DetectionTensors:
    """Read one split written by `make_detection_set` into `DetectionTensors`.

    Example:
        >>> split = load_split("data/det/val.json", "data/det/images")  # doctest: +SKIP
        >>> split.images.shape  # doctest: +SKIP
        torch.Size([500, 128, 128])
    """
    from PIL import Image

    coco = json.loads(Path(annotation_file).read_text(encoding="utf-8"))
    per_image: dict[int, list[dict]] = {image["id"]: [] for image in coco["images"]}
    for annotation in coco["annotations"]:
        per_image[annotation["image_id"]].append(annotation)
    most = max(1, max(len(v) for v in per_image.values()))
    images, counts, image_ids = [], [], []
    boxes = torch.zeros(len(coco["images"]), most, 4)
    classes = torch.zeros(len(coco["images"]), most, dtype=torch.long)
    for i, image in enumerate(coco["images"]):
        with Image.open(Path(image_dir) / image["file_name"]) as pil:
            images.append(torch.from_numpy(np.asarray(pil.convert("L"), dtype=np.uint8).copy()))
        width, height = image["width"], image["height"]
        for j, annotation in enumerate(per_image[image["id"]]):
            x, y, w, h = annotation["bbox"]
            boxes[i, j] = torch.tensor([(x + w / 2) / width, (y + h / 2) / height, w / width, h / height])
            classes[i, j] = annotation["category_id"]
        counts.append(len(per_image[image["id"]]))
        image_ids.append(image["id"])
    return DetectionTensors(torch.stack(images), boxes, classes, counts, image_ids, annotation_file)


@dataclass
class DetectionData:
    """The three splits; `test` is None with ``--num-test 0``."""

    train: DetectionTensors
    val: DetectionTensors
    test: DetectionTensors | None
    seconds: float  # generating (first time) and loading

    def to(self, device: torch.device) -> DetectionData:
        return DetectionData(self.train.to(device), self.val.to(device), self.test and self.test.to(device),
                             self.seconds)


def prepare_data(data_dir: Path, num_train: int, num_val: int, num_test: int, seed: int) -> DetectionData:
    """Generate (or reuse) the detection set in `data_dir` and load its splits.

    Train and val do not depend on `num_test` (`make_detection_set` draws each split from its own stream).
    """
    start = time.perf_counter()
    # "disjoint": the test split draws items no val image uses (a set made before that must not be reused)
    key = hashlib.sha1(f"{num_train}-{num_val}-{seed}-128-4-10-disjoint".encode()).hexdigest()[:10]
    out = data_dir / f"fashion_det_{num_train}_{num_val}_{num_test}_{key}"
    done = out / "COMPLETE"
    if not done.is_file():
        paths = make_detection_set(out, num_train=num_train, num_val=num_val, num_test=num_test, canvas=128,
                                   max_objects=4, seed=seed)
        done.write_text(json.dumps(paths), encoding="utf-8")
    paths = json.loads(done.read_text(encoding="utf-8"))
    train, val = load_split(paths["train"], paths["images"]), load_split(paths["val"], paths["images"])
    test = load_split(paths["test"], paths["images"]) if num_test else None
    return DetectionData(train, val, test, time.perf_counter() - start)


class BatchMaker:
    """Random training batches on the device: pixel tensors and DETR labels, with random horizontal flips."""

    def __init__(self, data: DetectionTensors, batch_size: int, seed: int, mean: float, std: float) -> None:
        self.data, self.batch_size, self.mean, self.std = data, batch_size, mean, std
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        device = self.data.images.device
        index = torch.randint(len(self.data.counts), (self.batch_size,), generator=self.generator)
        flip = (torch.rand(self.batch_size, generator=self.generator) < 0.5).to(device)
        index_device = index.to(device)
        pixels = normalize(self.data.images[index_device], self.mean, self.std)
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        boxes = self.data.boxes[index_device]
        centre_x = torch.where(flip[:, None], 1 - boxes[..., 0], boxes[..., 0])
        boxes = torch.cat([centre_x[..., None], boxes[..., 1:]], dim=-1)
        classes = self.data.classes[index_device]
        labels = [{"class_labels": classes[b, :n], "boxes": boxes[b, :n]}
                  for b, n in enumerate(self.data.counts[i] for i in index.tolist())]
        return pixels, labels


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(B, H, W)`` uint8 gray -> ``(B, 3, H, W)`` float, standardised."""
    pixels = (images.float() / 255 - mean) / std
    return pixels[:, None].expand(-1, 3, -1, -1)


# --------------------------------------------------------------------------------------------- models


def detr_config(d_model: int, layers: int, queries: int, num_labels: int) -> DetrConfig:
    """A from-scratch DETR: ResNet backbone (3 basic stages, stride 16), `layers` encoder and decoder layers."""
    backbone = ResNetConfig(num_channels=3, embedding_size=d_model // 4, hidden_sizes=[d_model // 4, d_model // 2, d_model],
                            depths=[1, 1, 1], layer_type="basic", out_features=["stage3"])
    return DetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                      d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                      encoder_attention_heads=max(1, d_model // 32), decoder_attention_heads=max(1, d_model // 32),
                      encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model, num_queries=queries,
                      num_labels=num_labels, auxiliary_loss=True, dropout=0.0)


def stack_ranks(model: DetrForObjectDetection, reduction: float) -> dict[str, int]:
    """The largest uniform private rank per stack (encoder, decoder) that removes `reduction` of its parameters."""
    ranks = {}
    for stack in STACKS:
        planned = plan_ranks(model, LorsConfig(target_reduction=reduction, target_modules=rf"model\.{stack}\.layers\..*"))
        ranks[stack] = planned[0].groups[0].ranks[0]
    return ranks


def build_model(variant: str, args: argparse.Namespace, seed: int) -> DetrForObjectDetection:
    """Dense DETR or its LORS version (same random init before lorsify); the backbone is made trainable
    (`run_detection.train_backbone_from_scratch`), its BatchNorms too unless ``--backbone-norm frozen``."""
    torch.manual_seed(seed)
    model = DetrForObjectDetection(detr_config(args.d_model, args.layers, args.queries, len(FASHION_MNIST_CLASSES)))
    train_backbone_from_scratch(model, trainable_norm=args.backbone_norm == "batch")
    if variant == "lors":
        ranks = stack_ranks(model, args.reduction)
        lorsify(model, rank={rf"^model\.{stack}\.": rank for stack, rank in ranks.items()}, init="scratch")
    return model


def detr_outputs(model: DetrForObjectDetection, pixels: torch.Tensor):
    """Final logits/boxes and the per-decoder-layer ones (for the auxiliary losses), as the model computes them."""
    outputs = model.model(pixel_values=pixels)
    logits = model.class_labels_classifier(outputs.last_hidden_state)
    boxes = model.bbox_predictor(outputs.last_hidden_state).sigmoid()
    intermediate = outputs.intermediate_hidden_states
    aux_logits = model.class_labels_classifier(intermediate)
    aux_boxes = model.bbox_predictor(intermediate).sigmoid()
    return logits, boxes, aux_logits, aux_boxes


def detr_loss(model: DetrForObjectDetection, pixels: torch.Tensor, labels: list[dict], bf16: bool) -> torch.Tensor:
    """DETR's loss; the network runs under bf16 autocast if asked, the matching and loss in fp32."""
    with torch.autocast(device_type=pixels.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits, boxes, aux_logits, aux_boxes = detr_outputs(model, pixels)
    loss, _, _ = model.loss_function(logits.float(), labels, pixels.device, boxes.float(), model.config,
                                     aux_logits.float(), aux_boxes.float())
    return loss


# ------------------------------------------------------------------------------------- train / eval


@dataclass
class VariantResult:
    variant: str
    ranks: dict[str, str]
    params: dict[str, tuple[int, int]]  # stack -> (dense, now); "model" for the whole model
    lr: float
    metrics: dict[str, float]  # on the validation split
    test_metrics: dict[str, float] | None  # on the test split (None without one)
    train_seconds: float
    eval_seconds: float
    losses: list[float] = field(default_factory=list)


def lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warmup, then cosine decay to 10% of `peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def predict(model: DetrForObjectDetection, data: DetectionTensors, mean: float, std: float, bf16: bool,
            batch_size: int = 64) -> list[dict]:
    """COCO-format detections (every query, its best non-background class) for every image of `data`."""
    model.eval()
    detections = []
    height, width = data.images.shape[-2:]
    for start in range(0, len(data.counts), batch_size):
        pixels = normalize(data.images[start : start + batch_size], mean, std)
        with torch.autocast(device_type=pixels.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, boxes, _, _ = detr_outputs(model, pixels)
        scores, classes = logits.float().softmax(-1)[..., :-1].max(-1)
        boxes = boxes.float()
        xywh = torch.stack([(boxes[..., 0] - boxes[..., 2] / 2) * width, (boxes[..., 1] - boxes[..., 3] / 2) * height,
                            boxes[..., 2] * width, boxes[..., 3] * height], dim=-1).cpu().tolist()
        scores, classes = scores.cpu().tolist(), classes.cpu().tolist()
        for b, image_id in enumerate(data.image_ids[start : start + batch_size]):
            for q in range(len(scores[b])):
                detections.append({"image_id": image_id, "category_id": classes[b][q], "bbox": xywh[b][q],
                                   "score": scores[b][q]})
    model.train()
    return detections


def coco_map(annotation_file: str, detections: list[dict]) -> dict[str, float]:
    """COCOeval bbox metrics: AP (0.50:0.95), AP50, AP75, AP small/medium/large, AR@10."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(annotation_file)
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    names = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR@1", "AR@10")
    return {name: float(evaluator.stats[i]) for i, name in enumerate(names)}


def count_params(model: DetrForObjectDetection) -> dict[str, tuple[int, int]]:
    report = parameter_report(model)
    counts = {}
    for row in report.stacks:
        stack = next(s for s in STACKS if f".{s}." in f".{row.name}.")
        counts[stack] = (row.dense, row.lors)
    counts["model"] = (report.total.dense, report.total.lors)
    return counts


def run_variant(variant: str, data: DetectionData, args: argparse.Namespace, mean: float, std: float) -> VariantResult:
    """Train one variant for ``args.steps`` steps at its peak lr ``args.lrs[variant]`` and evaluate it (COCO mAP on
    the validation and the test split)."""
    device = torch.device(args.device)
    model = build_model(variant, args, args.seed).to(device)
    model.train()
    ranks = {}
    if variant == "lors":  # the resolved per-layer ranks lorsify recorded, one value per stack
        for group, per_layer in model.config.lors_config["rank"].items():
            if not isinstance(per_layer, list):
                continue  # a group left dense
            stack = next(s for s in STACKS if f".{s}." in group.replace("\\", ""))
            ranks[stack] = ",".join(str(r) for r in sorted(set(per_layer)))
    peak_lr = args.lrs[variant]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=peak_lr,
                                  weight_decay=args.weight_decay)
    batches = BatchMaker(data.train, args.batch_size, seed=1000 + args.seed, mean=mean, std=std)
    warmup = max(1, int(0.05 * args.steps))
    losses: list[torch.Tensor] = []
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, warmup, peak_lr)
        pixels, labels = batches()
        loss = detr_loss(model, pixels, labels, args.bf16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            recent = torch.stack(losses[-args.log_every:]).mean().item()
            print(f"  [{variant}] step {step + 1}/{args.steps} loss {recent:.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = coco_map(data.val.annotation_file, predict(model, data.val, mean, std, args.bf16))
    test_metrics = None
    if data.test is not None:
        test_metrics = coco_map(data.test.annotation_file, predict(model, data.test, mean, std, args.bf16))
    eval_seconds = time.perf_counter() - start
    return VariantResult(variant, ranks, count_params(model), peak_lr, metrics, test_metrics, train_seconds,
                         eval_seconds, torch.stack(losses).float().cpu().tolist())


def _report(result: VariantResult) -> VariantResult:
    test = result.test_metrics
    print(f"{result.variant}: params {result.params}, ranks {result.ranks}, lr {result.lr:g}, "
          f"val AP {result.metrics['AP']:.4f} AP50 {result.metrics['AP50']:.4f}"
          + (f", test AP {test['AP']:.4f} AP50 {test['AP50']:.4f}" if test else "")
          + f", train {result.train_seconds:.0f} s", flush=True)
    return result


def _run_in_worker(variant: str, args: argparse.Namespace, mean: float, std: float) -> VariantResult:
    """One variant in a worker process (it reads the cached detection set itself)."""
    setup_run(args.threads)
    data = prepare_data(Path(args.data_dir), args.num_train, args.num_val, args.num_test, seed=args.seed)
    return run_variant(variant, data.to(torch.device(args.device)), args, mean, std)


def train_all(data: DetectionData, args: argparse.Namespace, mean: float, std: float) -> list[VariantResult]:
    """``args.variants`` in order (dense, LORS); with ``args.jobs`` > 1 they train at once in worker processes
    (same figures, as each run depends only on its variant and arguments)."""
    if args.jobs <= 1:
        return [_report(run_variant(variant, data, args, mean, std)) for variant in args.variants]
    results = run_in_processes(_run_in_worker, [(variant, args, mean, std) for variant in args.variants], args.jobs)
    return [_report(result) for result in results]


# ------------------------------------------------------------------------------------------- report


def save_plots(results: list[VariantResult], out_dir: Path, steps: int, prefix: str = SECTION) -> list[str]:
    """Training-loss curves and the mAP bars; returns the PNG file names (written in `out_dir`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    k = max(1, steps // 30)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for result in results:
        curve = np.convolve(result.losses, np.ones(k) / k, mode="valid")
        left.plot(np.arange(k, len(result.losses) + 1), curve, label=result.variant)
    left.set_xlabel("step")
    left.set_ylabel(f"DETR training loss ({k}-step average)")
    left.grid(alpha=0.3)
    left.legend()
    bars = [("val AP", "metrics", "AP"), ("val AP50", "metrics", "AP50")]
    if results[0].test_metrics:
        bars += [("test AP", "test_metrics", "AP"), ("test AP50", "test_metrics", "AP50")]
    width = 0.8 / len(results)
    for i, result in enumerate(results):
        right.bar(np.arange(len(bars)) + i * width, [100 * getattr(result, split)[name] for _, split, name in bars],
                  width, label=f"{result.variant} (lr {result.lr:g})")
    right.set_xticks(np.arange(len(bars)) + width * (len(results) - 1) / 2, [label for label, _, _ in bars])
    right.set_ylabel("COCO metric (%)")
    right.legend()
    right.grid(alpha=0.3, axis="y")
    fig.suptitle("DETR from scratch on Fashion-MNIST detection: dense vs LORS")
    fig.tight_layout()
    name = f"{prefix}.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return [name]


def run_lrs(args: argparse.Namespace) -> dict[str, float]:
    """The peak learning rate of each variant this run trains."""
    return {variant: args.lrs[variant] for variant in args.variants}


def lr_suffix(args: argparse.Namespace) -> str:
    """``""`` at the preset's learning rates, else ``"_lr0.0003"`` (one for every variant trained) or
    ``"_dense-lr0.00022_lors-lr0.0004"``."""
    lrs = run_lrs(args)
    if all(lr == PRESETS[args.preset]["lrs"][variant] for variant, lr in lrs.items()):
        return ""
    if len(set(lrs.values())) == 1:
        return f"_lr{next(iter(lrs.values())):g}"
    return "".join(f"_{variant}-lr{lr:g}" for variant, lr in lrs.items())


def lr_words(args: argparse.Namespace) -> str:
    """``"0.0003"`` (one for every variant trained) or ``"0.00022 (dense) / 0.0004 (lors)"``."""
    lrs = run_lrs(args)
    if len(set(lrs.values())) == 1:
        return f"{next(iter(lrs.values())):g}"
    return " / ".join(f"{lr:g} ({variant})" for variant, lr in lrs.items())


def section_name(args: argparse.Namespace) -> str:
    """The run's RESULTS.md section: ``bench_detr``, suffixed ``_steps<N>``, ``_batch<N>``, ``_train<N>``,
    ``_val<N>``, ``_test<N>`` for a budget or data size other than the preset's, ``_lr<value(s)>`` for learning
    rates other than the preset's, ``_frozen_bn`` for ``--backbone-norm frozen``, ``_seed<N>`` for a seed other
    than 0, the variant's name for a run of one variant and ``_gpu`` on CUDA, so such runs keep their own."""
    preset = PRESETS[args.preset]
    section = SECTION + "".join(f"_{name}{getattr(args, key)}" for key, name in BUDGET_SUFFIXES
                                if getattr(args, key) != preset[key])
    section += lr_suffix(args)
    section += "_frozen_bn" if args.backbone_norm == "frozen" else ""
    section += f"_seed{args.seed}" if args.seed != 0 else ""
    section += "".join(f"_{variant}" for variant in args.variants) if len(args.variants) < len(VARIANTS) else ""
    return device_section(section, args.device)


def render_markdown(results: list[VariantResult], args: argparse.Namespace, data: DetectionData, plots: list[str],
                    command: str, wall: float) -> str:
    """The ``bench_detr`` section of RESULTS.md."""
    train, val, test = data.train, data.val, data.test
    by_name = {r.variant: r for r in results}
    device_line = f"device {args.device}{', bf16 autocast' if args.bf16 else ', fp32'}"
    if args.device == "cpu":
        device_line += (f", {args.threads} torch CPU thread(s) per run, {args.jobs} run(s) at once (the CPU is shared "
                        "with other jobs: times are noisy)")
    lines = [
        "## DETR from scratch on a Fashion-MNIST detection set (`scripts/bench_detr.py`)"
        + (" on GPU" if args.device != "cpu" else "")
        + (f", {args.preset} preset at peak lr {lr_words(args)}" if lr_suffix(args) else "")
        + (", frozen backbone BatchNorm" if args.backbone_norm == "frozen" else "")
        + (f", seed {args.seed}" if args.seed != 0 else ""),
        "",
        f"Machine: {machine_description()}; {device_line}. Total wall time {wall / 60:.1f} min "
        f"(data generation and loading {data.seconds:.0f} s).",
        "",
        "```",
        command,
        "```",
        "",
        f"Setup: `DetrForObjectDetection` from a config: ResNet backbone (basic blocks, stages "
        f"{args.d_model // 4}/{args.d_model // 2}/{args.d_model} channels, stride 16, trained from scratch, "
        + ("trainable BatchNorm in place of DETR's frozen one" if args.backbone_norm == "batch"
           else "frozen-identity BatchNorm as DETR builds it")
        + f"), d_model {args.d_model}, {args.layers} encoder + {args.layers} "
        f"decoder layers, {args.queries} queries, auxiliary decoding losses, no dropout. Data: "
        f"`make_detection_set` with {len(train.counts):,} train / {len(val.counts):,} val"
        + (f" / {len(test.counts):,} test" if test else "")
        + f" images (128x128, 1-4 Fashion-MNIST items of 10 classes, {sum(train.counts):,} / {sum(val.counts):,}"
        + (f" / {sum(test.counts):,}" if test else "")
        + (" boxes; val and test items come from Fashion-MNIST's test split, each split from its own random stream, "
           "test images from items no val image uses), "
           if test else " boxes; val items come from Fashion-MNIST's test split), ")
        + f"random horizontal flips. Same batches, AdamW at each variant's peak lr (in the table; weight decay "
        f"{args.weight_decay}), 5% warmup then cosine to 10%, gradient "
        f"clipping {args.clip}, {args.steps} steps x {args.batch_size} images "
        f"({args.steps * args.batch_size / len(train.counts):.1f} epochs), seed {args.seed}. "
        f"LORS: `lorsify(init=\"scratch\")` of the encoder and the decoder, each at the largest uniform private rank "
        f"removing >= {args.reduction:.0%} of its stack's parameters. mAP: pycocotools COCOeval (bbox), "
        "every query's best class as a detection; learning rates are chosen by val AP, test is held out.",
        "",
        "| variant | decoder params | encoder params | model params | private rank (enc/dec) | peak lr | val AP % | "
        "val AP50 % | val AP75 % | val AR@10 % | test AP % | test AP50 % | final loss | train time | s / step |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        dec_dense, dec_now = result.params["decoder"]
        enc_dense, enc_now = result.params["encoder"]
        ranks = f"{result.ranks['encoder']}/{result.ranks['decoder']}" if result.ranks else "-"
        final_loss = float(np.mean(result.losses[-max(1, args.steps // 20):]))
        m, t = result.metrics, result.test_metrics
        test_cells = f"{100 * t['AP']:.2f} | {100 * t['AP50']:.2f}" if t else "- | -"
        lines.append(
            f"| {result.variant} | {dec_now:,} ({dec_now / dec_dense - 1:+.1%}) | {enc_now:,} ({enc_now / enc_dense - 1:+.1%}) | "
            f"{result.params['model'][1]:,} | {ranks} | {result.lr:g} | {100 * m['AP']:.2f} | {100 * m['AP50']:.2f} | "
            f"{100 * m['AP75']:.2f} | {100 * m['AR@10']:.2f} | {test_cells} | {final_loss:.3f} | "
            f"{result.train_seconds / 60:.1f} min | "
            f"{result.train_seconds / args.steps:.3f} |"
        )
    if "dense" in by_name and "lors" in by_name:
        gaps = []
        for split, attribute in (("val", "metrics"), ("test", "test_metrics")):
            dense, lors = getattr(by_name["dense"], attribute), getattr(by_name["lors"], attribute)
            if dense and lors:
                gaps.append(f"{split} AP {100 * (lors['AP'] - dense['AP']):+.2f}, AP50 "
                            f"{100 * (lors['AP50'] - dense['AP50']):+.2f}")
        lines += ["", f"LORS minus dense, in points: {'; '.join(gaps)} (one seed: run-to-run noise is not measured here)."]
    lines += ["", *[f"![{name}]({name})" for name in plots]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="default steps/batch/data sizes (explicit flags override them)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--num-train", type=int)
    parser.add_argument("--num-val", type=int)
    parser.add_argument("--num-test", type=int, help="held-out test images (0: none)")
    parser.add_argument("--lr", type=float,
                        help="peak learning rate of every variant (the cpu preset's: dense 2.2e-4, LORS 3e-4; other "
                             "than the preset's: own section, _lr<value>)")
    parser.add_argument("--dense-lr", type=float, help="peak learning rate of the dense model (overrides --lr)")
    parser.add_argument("--lors-lr", type=float, help="peak learning rate of the LORS model (overrides --lr)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--clip", type=float, default=0.1, help="gradient-norm clipping (DETR's 0.1)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6, help="encoder layers = decoder layers")
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--reduction", type=float, default=0.7, help="LORS: fraction of each stack's parameters removed")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the detection set, the init and the batches (not 0: own section, _seed<N>)")
    parser.add_argument("--backbone-norm", choices=("batch", "frozen"), default="batch",
                        help="backbone BatchNorm: trainable (batch) or DETR's frozen one, the identity from scratch")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="which models to train (default both)")
    parser.add_argument("--jobs", type=int, help="variants trained at once in worker processes (CPU preset: 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the network (loss in fp32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on the shared 2-core box two OpenMP threads ran up to 17x slower)")
    parser.add_argument("--data-dir", default=os.environ.get("LORS_DETR_DATA", "/tmp/lors_detr_data"))
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="a tiny run in seconds (for tests)")
    parser.add_argument("--results-file", default=str(RESULTS_FILE))
    args = parser.parse_args(argv)
    refuse_smoke_into_docs(parser, args)
    if args.smoke:
        args.preset = "smoke"
        args.d_model, args.layers, args.log_every = 32, 6, 1
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for variant in VARIANTS:  # --dense-lr / --lors-lr, else --lr, else the preset's
        for given in (getattr(args, f"{variant}_lr"), args.lr):
            if given is not None:
                args.lrs = {**args.lrs, variant: given}
                break
    if min(args.lrs.values()) <= 0 or args.num_test < 0:
        parser.error(f"learning rates must be > 0 and --num-test >= 0, got lrs {args.lrs}, --num-test {args.num_test}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_run(args.threads)
    command = "HF_HUB_OFFLINE=1 python scripts/bench_detr.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    wall = time.perf_counter()
    data = prepare_data(Path(args.data_dir), args.num_train, args.num_val, args.num_test, seed=args.seed)
    print(f"data: {len(data.train.counts)} train / {len(data.val.counts)} val / "
          f"{len(data.test.counts) if data.test else 0} test images ({data.seconds:.0f} s)", flush=True)
    pixels = data.train.images.float() / 255
    mean, std = float(pixels.mean()), float(pixels.std())
    results = train_all(data.to(torch.device(args.device)), args, mean, std)
    results_file = Path(args.results_file)
    section = section_name(args)
    plots = save_plots(results, results_file.parent, args.steps, prefix=section)
    markdown = render_markdown(results, args, data, plots, command.strip(), time.perf_counter() - wall)
    update_section(section, markdown, results_file)
    print(markdown)


if __name__ == "__main__":
    main()
