"""Tests of the real offline assets: checkpoints, data sets, the detection-set builder and the metrics."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lors_hf import assets  # noqa: E402


def test_minilm_loads_and_embeds() -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = assets.minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    sentences = [
        "A cat sits on the mat.",
        "A kitten is sitting on a rug.",
        "Stock markets fell sharply today.",
    ]
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb.shape == (3, 384)
    sim = emb @ emb.T
    # Real pretrained weights: paraphrases are much closer than unrelated sentences.
    assert sim[0, 1] > 0.5 and sim[0, 1] > sim[0, 2] + 0.3


def _columns(ds, split: str) -> tuple[list[str], list[int]]:
    return list(ds[split]["text"]), list(ds[split]["label"])


def test_rotten_tomatoes_counts_labels_and_split() -> None:
    ds = assets.rotten_tomatoes(seed=0)
    assert set(ds) == {"train", "test"}
    assert ds["train"].column_names == ["text", "label"]
    (train_x, train_y), (test_x, test_y) = _columns(ds, "train"), _columns(ds, "test")
    assert Counter(train_y + test_y) == {1: 7403, 0: 5405}  # plot summaries dropped
    assert len(test_x) / (len(train_x) + len(test_x)) == pytest.approx(0.2, abs=0.01)
    assert not set(train_x) & set(test_x)  # exact duplicates never straddle the splits
    by_text = dict(zip(train_x + test_x, train_y + test_y, strict=True))
    gem = "A small gem of a movie that defies classification and is as thought-provoking as it is funny, scary and sad."
    assert by_text[gem] == 1
    assert by_text["Hollywood's answer to an air ball."] == 0
    assert ds["train"].features["label"].names == ["negative", "positive"]


def test_rotten_tomatoes_deterministic() -> None:
    a, b, c = assets.rotten_tomatoes(seed=3), assets.rotten_tomatoes(seed=3), assets.rotten_tomatoes(seed=4)
    assert _columns(a, "train") == _columns(b, "train") and _columns(a, "test") == _columns(b, "test")
    assert _columns(a, "test")[0] != _columns(c, "test")[0]


def test_shakespeare_text_and_splits() -> None:
    plays = assets.shakespeare_plays()
    assert len(plays) == 38 and "tragedies/hamlet" in plays
    text = assets.shakespeare_text()
    assert len(text.split()) > 500_000
    assert "To be, or not to be: that is the question:" in plays["tragedies/hamlet"]
    assert "HAMLET:\n" in plays["tragedies/hamlet"]
    for markup in ("*", "_", "\\", "\n#"):
        assert markup not in text
    splits = assets.shakespeare_splits()
    assert splits == assets.shakespeare_splits()
    sizes = {k: len(v) for k, v in splits.items()}
    total = sum(sizes.values())
    assert abs(total - len(text)) < 100  # the splits partition the text
    assert sizes["validation"] / total == pytest.approx(0.05, abs=0.005)
    assert sizes["test"] / total == pytest.approx(0.05, abs=0.005)
    assert "HAMLET:" in splits["test"] and "THESEUS:" in splits["validation"]  # every split spans the plays


def test_fashion_mnist_real_items() -> None:
    images, labels = assets.fashion_mnist()
    assert images.shape == (70_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (70_000,)
    assert Counter(labels.tolist()) == dict.fromkeys(range(10), 7000)
    assert labels[0] == 9  # the official first training item is an ankle boot
    assert 60 < images.mean() < 80 and images.max() == 255


def test_fashion_mnist_fetches_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    if shutil.which("apt-get") is None:
        pytest.skip("apt-get unavailable")
    monkeypatch.setattr(assets, "_FASHION_SYSTEM_DIR", tmp_path / "no-system-install")
    images, labels = assets.fashion_mnist(tmp_path / "fm")
    assert images.shape == (70_000, 28, 28) and labels[-1] == 5  # last official test item: a sandal
    assert sorted(os.listdir(tmp_path)) == ["fm"]  # no temp dir or .deb left behind
    assert len(os.listdir(tmp_path / "fm")) == 4


def test_fashion_mnist_without_apt_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "_FASHION_SYSTEM_DIR", tmp_path / "no-system-install")
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get download dataset-fashion-mnist"):
        assets.fashion_mnist(tmp_path / "fm")


def test_a_truncated_cached_file_names_the_fix(tmp_path: Path) -> None:
    """A damaged cache is a ValueError that says what to remove, not an EOFError or a safetensors error."""
    import shutil

    assets.fashion_mnist()  # fetched into the cache unless the system has it
    source = next(d for d in (assets._CACHE_ROOT / "fashion-mnist", assets._FASHION_SYSTEM_DIR)
                  if all((d / n).is_file() for n in assets._FASHION_FILES))
    cache = tmp_path / "fm"
    shutil.copytree(source, cache)
    damaged = cache / assets._FASHION_FILES[0]
    damaged.write_bytes(damaged.read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"truncated or corrupted .*; remove {cache} to fetch it again"):
        assets.fashion_mnist(cache)

    smollm2 = tmp_path / "smollm2"
    smollm2.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (smollm2 / name).write_text("{}")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1000)}, smollm2 / "model.safetensors")
    assert assets.smollm2_path(smollm2) == str(smollm2)
    weights = smollm2 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(ValueError, match=f"model.safetensors is truncated or corrupted .*remove {smollm2}"):
        assets.smollm2_path(smollm2)


def _check_coco(coco: dict, image_dir: Path, canvas: int, num_classes: int) -> int:
    """Validate one COCO file against its images; return the number of boxes."""
    from PIL import Image

    assert [c["id"] for c in coco["categories"]] == list(range(num_classes))
    by_image: dict[int, list[dict]] = {}
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids) and min(ann_ids) >= 1
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for info in coco["images"]:
        img = np.asarray(Image.open(image_dir / info["file_name"]).convert("L"))
        assert img.shape == (canvas, canvas) == (info["height"], info["width"])
        covered = np.zeros_like(img, dtype=bool)
        anns = by_image.get(info["id"], [])
        assert anns, "every image holds at least one item"
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= canvas and y + h <= canvas and w > 0 and h > 0
            assert ann["area"] == w * h and ann["iscrowd"] == 0
            assert 0 <= ann["category_id"] < num_classes
            crop = img[y : y + h, x : x + w] > 0
            # tight: the item's nonzero pixels touch all four sides of its box
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
            assert not covered[y : y + h, x : x + w].any(), "boxes overlap"
            covered[y : y + h, x : x + w] = True
        assert not (img[~covered] > 0).any(), "nonzero pixels outside every box"
    return len(coco["annotations"])


def test_make_detection_set(tmp_path: Path) -> None:
    canvas, num_classes = 96, 4
    paths = assets.make_detection_set(
        tmp_path / "a", num_train=12, num_val=5, canvas=canvas, seed=1, num_classes=num_classes
    )
    image_dir = Path(paths["images"])
    n_boxes = 0
    for split, n in (("train", 12), ("val", 5)):
        coco = json.loads(Path(paths[split]).read_text())
        assert len(coco["images"]) == n
        n_boxes += _check_coco(coco, image_dir, canvas, num_classes)
    assert n_boxes > 17  # several items per image on average
    again = assets.make_detection_set(
        tmp_path / "b", num_train=12, num_val=5, canvas=canvas, seed=1, num_classes=num_classes
    )
    assert Path(again["train"]).read_text() == Path(paths["train"]).read_text()
    assert (Path(again["images"]) / "val_000003.png").read_bytes() == (
        image_dir / "val_000003.png"
    ).read_bytes()
    other = assets.make_detection_set(
        tmp_path / "c", num_train=12, num_val=0, canvas=canvas, seed=2, num_classes=num_classes
    )
    assert Path(other["train"]).read_text() != Path(paths["train"]).read_text()


def test_detection_test_split_leaves_train_and_val_unchanged(tmp_path: Path) -> None:
    """num_test adds a held-out split with its own images; train and val stay byte for byte the same."""
    without = assets.make_detection_set(tmp_path / "a", num_train=6, num_val=4, seed=3)
    with_test = assets.make_detection_set(tmp_path / "b", num_train=6, num_val=4, seed=3, num_test=5)
    assert "test" not in without
    for split in ("train", "val"):
        assert Path(with_test[split]).read_text() == Path(without[split]).read_text()
    test = json.loads(Path(with_test["test"]).read_text())
    assert len(test["images"]) == 5 and _check_coco(test, Path(with_test["images"]), 128, 10) >= 5
    val_png = (Path(with_test["images"]) / "val_000001.png").read_bytes()
    assert (Path(with_test["images"]) / "test_000001.png").read_bytes() != val_png
    with pytest.raises(ValueError, match="non-negative"):
        assets.make_detection_set(tmp_path / "c", num_train=1, num_val=1, num_test=-1)


def test_detection_test_images_hold_no_item_of_a_val_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test split is the unbiased check of settings chosen on val: its images were new compositions but
    shared about 11% of their Fashion-MNIST items with the val images; now they share none."""
    items: dict[str, set[bytes]] = {}
    build = assets._build_split

    def recording(split, n, pool_images, *args, picked=None, **kwargs):
        picked = [] if picked is None else picked
        result = build(split, n, pool_images, *args, picked=picked, **kwargs)
        items[split] = {pool_images[k].tobytes() for k in picked}
        return result

    monkeypatch.setattr(assets, "_build_split", recording)
    assets.make_detection_set(tmp_path, num_train=0, num_val=300, num_test=300, seed=0)
    assert len(items["val"]) > 500 and len(items["test"]) > 500
    assert not items["val"] & items["test"]


def test_split_makers_refuse_a_seed_or_count_that_is_not_an_int(tmp_path: Path) -> None:
    """seed=None drew another split on every call (the docstrings promise determinism); a float count was a
    TypeError deep in numpy."""
    with pytest.raises(TypeError, match="seed must be an int"):
        assets.rotten_tomatoes(seed=None)
    with pytest.raises(TypeError, match="seed must be an int"):
        assets.make_detection_set(tmp_path, num_train=1, num_val=1, seed=None)
    with pytest.raises(TypeError, match="num_train must be an int, got 2.5"):
        assets.make_detection_set(tmp_path, num_train=2.5, num_val=1)


def test_detection_set_loads_in_pycocotools(tmp_path: Path) -> None:
    coco_mod = pytest.importorskip("pycocotools.coco")
    paths = assets.make_detection_set(tmp_path, num_train=3, num_val=2, seed=0)
    coco = coco_mod.COCO(paths["val"])
    assert len(coco.getImgIds()) == 2 and len(coco.getCatIds()) == 10


def test_accuracy_metric_offline() -> None:
    import evaluate

    from lors_hf.metrics import load_metric, metric_path

    metric = load_metric("accuracy")
    assert metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0]) == {"accuracy": 0.75}
    assert metric.compute(
        predictions=[1, 1], references=[1, 0], normalize=False, sample_weight=[2.0, 5.0]
    ) == {"accuracy": 2.0}
    direct = evaluate.load(metric_path("accuracy"))
    direct.add_batch(predictions=[2, 2, 0], references=[2, 1, 0])
    assert direct.compute()["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="available"):
        load_metric("no_such_metric")


@pytest.mark.slow
def test_smollm2_conversion(tmp_path: Path) -> None:
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path / "smollm2"
    path = Path(assets.smollm2_path(cache))
    assert path == cache
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]  # no temp dir left behind
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    start = time.perf_counter()
    assert assets.smollm2_path(cache) == str(cache)  # cached: no second conversion
    assert time.perf_counter() - start < 1.0

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    sentence = "The capital of France is Paris. It is a large city with many museums."
    shuffled = "museums capital many Paris. large It France city of with The a is is"

    def loss(text: str) -> float:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            return model(ids, labels=ids).loss.item()

    # Real weights: fluent English scores far better than a word salad of the same words.
    assert loss(sentence) < 4.0 < loss(shuffled)
