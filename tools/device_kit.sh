#!/usr/bin/env bash
# Builds .device/: the Python packages qlora_lite needs that the lent GPU machine's image (Python 3.12, torch
# 2.11+cu130, transformers 5.17, accelerate 1.15, ...) lacks or has at another version. That machine has no network
# and no package registry, and what travels to it (working tree + carried paths) is capped at 64 MiB, so:
#   .device/site/         pip --target folder for PYTHONPATH: 78 MiB (transformers alone 53), too big to carry
#   .device/site.tar.xz   the same packed, 13 MiB: the one path to carry; the device command unpacks it.
# Versions are this machine's (pip list), so GPU results come from the same stack as CPU ones. torch is never
# carried (the image's CUDA build is used); bitsandbytes keeps only its CPU and CUDA 13 libraries.
# Usage: bash tools/device_kit.sh   (rebuilds from scratch; PYVER=3.11 picks the 3.11 wheels instead)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
PKGS="transformers accelerate huggingface-hub httpx2 httpcore2 truststore idna click regex kernels tomlkit peft trl bitsandbytes datasets dill multiprocess rouge-score nltk gguf"
PINS=$(python3 -c 'import sys, importlib.metadata as m; print(*(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $PKGS)
rm -rf .device && mkdir -p .device/site
# --no-deps: everything else they import is in the image. multiprocess has one wheel per Python, bitsandbytes per OS.
python3 -m pip install -q --root-user-action=ignore --no-deps --no-compile --target .device/site --python-version "$PYVER" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 $PINS
cd .device
find site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13?.so' -delete
rm -rf site/bin && find site -name __pycache__ -prune -exec rm -rf {} +
tar -cf - site | xz -T0 -9 > site.tar.xz
echo "carried: $PINS"
du -sh --apparent-size site site.tar.xz
cat <<'EOF'
On the device: carry [".device/site.tar.xz"] and begin the command with:
python3 -c "import tarfile; tarfile.open('.device/site.tar.xz').extractall('.device', filter='data')" && export PYTHONPATH=$PWD/.device/site:$PWD PYTHONUNBUFFERED=1 && python3 -c "import torch, transformers, bitsandbytes, peft, trl, datasets as d; print(torch.__version__, torch.cuda.get_device_name(), transformers.__version__, bitsandbytes.__version__, peft.__version__, trl.__version__, d.__version__)" &&
then e.g.: python3 tools/bench_memory.py --gpu --methods qlora,lora,full,prompt_tuning
EOF
