#!/usr/bin/env python
"""Build every data set the training scripts read, from the offline packages (see lors_hf.assets).

    python scripts/prepare_data.py --out data            # full sets
    python scripts/prepare_data.py --out data --small    # small slices for tests

Writes:
    <out>/rotten_tomatoes/{train,test}.csv            columns text,label (1 = positive, 0 = negative)
    <out>/shakespeare/{train,validation,test}.txt     plain text, split per play by contiguous chunks
    <out>/fashion_detection/{train,val}.json          COCO detection annotations
    <out>/fashion_detection/images/*.png              file_name in the JSON is relative to this dir
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SMALL_SENTIMENT = {"train": 200, "test": 100}
SMALL_TEXT_CHARS = {"train": 40_000, "validation": 5_000, "test": 5_000}
SMALL_DETECTION = (40, 20)


def _truncate_at_line(text: str, max_chars: int) -> str:
    """At most ``max_chars`` characters of ``text``, cut after a whole line where possible."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut + 1] if cut > 0 else text[:max_chars]


def write_sentiment(out: Path, small: bool, seed: int) -> list[str]:
    """Write ``rotten_tomatoes/{train,test}.csv``; return report lines.

    Example:
        >>> write_sentiment(Path("data"), small=True, seed=0)  # doctest: +SKIP
    """
    from lors_hf.assets import rotten_tomatoes

    ds = rotten_tomatoes(seed=seed)
    d = out / "rotten_tomatoes"
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for split in ("train", "test"):
        data = ds[split]
        if small:
            data = data.select(range(min(SMALL_SENTIMENT[split], len(data))))
        path = d / f"{split}.csv"
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(zip(data["text"], data["label"], strict=True))
        n_pos = sum(data["label"])
        lines.append(f"{path}: {len(data)} rows ({n_pos} positive, {len(data) - n_pos} negative)")
    return lines


def write_shakespeare(out: Path, small: bool) -> list[str]:
    """Write ``shakespeare/{train,validation,test}.txt``; return report lines.

    Example:
        >>> write_shakespeare(Path("data"), small=True)  # doctest: +SKIP
    """
    from lors_hf.assets import shakespeare_splits

    d = out / "shakespeare"
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for split, text in shakespeare_splits().items():
        if small:
            text = _truncate_at_line(text, SMALL_TEXT_CHARS[split])
        path = d / f"{split}.txt"
        path.write_text(text, encoding="utf-8")
        lines.append(f"{path}: {len(text):,} characters, {len(text.split()):,} words")
    return lines


def write_detection(out: Path, num_train: int, num_val: int, num_classes: int, seed: int) -> list[str]:
    """Write the Fashion-MNIST COCO detection set under ``fashion_detection/``; return report lines.

    Example:
        >>> write_detection(Path("data"), 40, 20, num_classes=10, seed=0)  # doctest: +SKIP
    """
    from lors_hf.assets import make_detection_set

    d = out / "fashion_detection"
    if d.exists():
        shutil.rmtree(d)  # no stale images from an earlier, larger build
    paths = make_detection_set(d, num_train=num_train, num_val=num_val, seed=seed, num_classes=num_classes)
    lines = []
    for split in ("train", "val"):
        coco = json.loads(Path(paths[split]).read_text(encoding="utf-8"))
        lines.append(
            f"{paths[split]}: {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
            f"{len(coco['categories'])} classes"
        )
    lines.append(f"{paths['images']}: {len(os.listdir(paths['images']))} PNG images")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Example:
        >>> main(["--out", "/tmp/lorsdata", "--small"])  # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="data", help="output directory (default: data)")
    parser.add_argument("--small", action="store_true", help="small slices, for tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--det-train", type=int, default=4000, help="detection train images (full build)")
    parser.add_argument("--det-val", type=int, default=500, help="detection val images (full build)")
    parser.add_argument("--det-classes", type=int, default=10, help="use the first N Fashion-MNIST classes")
    args = parser.parse_args(argv)

    out = Path(args.out)
    num_train, num_val = SMALL_DETECTION if args.small else (args.det_train, args.det_val)
    steps = [
        ("sentiment", lambda: write_sentiment(out, args.small, args.seed)),
        ("shakespeare", lambda: write_shakespeare(out, args.small)),
        ("detection", lambda: write_detection(out, num_train, num_val, args.det_classes, args.seed)),
    ]
    for name, step in steps:
        start = time.perf_counter()
        lines = step()
        print(f"[{name}] ({time.perf_counter() - start:.1f} s)")
        for line in lines:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
