#!/usr/bin/env bash
# The GPU check (docs/performance.md, "On a GPU"), for a session lent a device machine: the CUDA suite, then the
# bench on the GPU. The device image has torch, numba, scipy, pandas and pytest but not these, and cannot reach
# PyPI, so fetch their wheels here first (into an ignored folder that the device call carries):
#   echo /.devsite/ >> .git/info/exclude; mkdir -p .devsite/wheels && cd .devsite/wheels
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       hydra-core==1.3.8 omegaconf==2.3.1 submitit==1.5.4 hydra-submitit-launcher==1.2.0 blosc==1.11.4
#   pip download --no-deps --no-binary=:all: antlr4-python3-runtime==4.9.3 && pip wheel --no-deps antlr4*.tar.gz -w .
# then run `bash .ci/gpu_check.sh` there with carry [".devsite"] (~190 s on an H100, start excluded).
# Results land in $OUT: env.txt, test_cuda.log, bench.log, bench.json, bench.md.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -V
  git rev-parse --short HEAD 2>/dev/null; } > "$OUT/env.txt" 2>&1
python3 -m pip install -q --no-index --no-deps .devsite/wheels/*.whl > "$OUT/pip.log" 2>&1 || echo "pip rc $?" >> "$OUT/pip.log"
export PYTHONPATH=$PWD
python3 -c "import torch, numba, hydra, blosc; print(torch.__version__, numba.__version__, hydra.__version__,
torch.cuda.get_device_name(0))" >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/test_cuda.log" 2>&1
echo "pytest rc $?" >> "$OUT/test_cuda.log"
tail -15 "$OUT/test_cuda.log"
timeout 200 python3 -m detox.bench --device cuda --n 45 --d 1e3 1e5 1.1e7 --no-reference --out "$OUT/bench.json" \
    > "$OUT/bench.log" 2>&1
echo "bench rc $?" >> "$OUT/bench.log"
tail -40 "$OUT/bench.log"
