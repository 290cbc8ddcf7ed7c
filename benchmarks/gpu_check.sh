#!/usr/bin/env bash
# The checks a GPU machine is for, in one go: the CUDA tests (skipped where CI runs, which has no
# GPU), then the whole pipeline timed on the GPU with the given -S overrides.
#   bash benchmarks/gpu_check.sh [NAME] [-S key=value ...]   -> reports/benchmarks/NAME.json (+ .log)
# Packages the machine lacks may lie as wheels in .whl/: they are installed under /tmp/site first.
set -euo pipefail
name=${1:-pipeline_gpu}; shift || true
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
tests=0
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py || tests=$?  # the timing runs either way
python3 benchmarks/pipeline_time.py --name "$name" "$@"
exit $tests
