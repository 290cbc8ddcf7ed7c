#!/usr/bin/env bash
# Wheels for the packages benchmarks/gpu_check.sh needs that the lent GPU machine's image lacks
# (its Python is 3.12; it reaches no package index). Run here, in the repo's root, before the
# device call; then name .whl in the call's `carry` (gpu_check.sh installs them under /tmp/site).
# The versions are this venv's. MLflow is not among them: the suite's steps run without it
# (pipeline.loop imports it only where a run is open), only the optional tests/test_cuda.py needs it.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
version() { python3 -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
for pkg in pydantic pydantic_core annotated-types typing-inspection typing_extensions open_clip_torch ftfy wcwidth; do
  v=$(version "$pkg")
  [[ -n $v ]] || { echo "gpu_wheels: $pkg is not installed here (activate the venv)"; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg==$v"
done
ls -la .whl
du -sh .whl
