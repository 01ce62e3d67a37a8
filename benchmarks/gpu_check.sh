#!/usr/bin/env bash
# The one prepared GPU check (under 8 minutes on one GPU): the device-parametrised tests on CUDA, then the GPU
# targets of benchmarks/bench_gpu.py, written to benchmarks/results/gpu_{hta,urnn,manifold}.{json,png}.
# Run from the repository root after `make setup`:  bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
# HH_REQUIRE_CUDA=1: a test run that silently fell back to the CPU is an error (tests/conftest.py)
HH_REQUIRE_CUDA=1 timeout 240 "$PY" -m pytest -q -p no:cacheprovider \
    tests/hh_peft/test_on_devices.py tests/unitary_rnn/test_on_devices.py
timeout 300 "$PY" benchmarks/bench_gpu.py --device cuda --out benchmarks/results/gpu
