#!/usr/bin/env bash
# The checks a GPU machine is for, in one go.
#
#   bash benchmarks/gpu_check.sh
#     Where a training step's time goes (issue 23), within GPU_CHECK_BUDGET seconds (default 540),
#     each step under its own timeout, the suite going on past a failure:
#     - the contrastive loss's memory and time at global batch 32,000 and 64,000, as one rank of 1,000;
#     - torch.profiler over the stage's step: the default model (its batch, 128) and a ViT-B/32 at
#       224 px (batch 256), with Chrome traces;
#     - train_throughput against open_clip at batch 256: the ViT-B/32 and the default model;
#     - A/B timings of the default model: the finite check read every step, 4 DataLoader workers;
#     - the ViT-B/16 step at batch 256 and 64 (docs/scale.md), torch.compile on the default model
#       (mode default, and reduce-overhead: CUDA graphs);
#     - tests/test_cuda.py, if time is left and MLflow is installed.
#     Writes reports/benchmarks/{loss_memory_cuda,profile_cuda_*,train_throughput_cuda_*}.json,
#     the traces, gpu_summary.md and gpu_check_suite.log; where $OUT is set (the device tool) it also
#     leaves there gpu_check_results.tgz (JSON, summary, log), gpu_check_traces.tgz and the log.
#     GPU_CHECK_ONLY="default_cudagraphs default_compile" runs only the named steps (a short rerun).
#     GPU_CHECK_DRY=1 runs the same commands on the CPU at toy sizes into /tmp/gpu_check_dry
#     (everything but CUDA; ViT-B/16 and torch.compile left out: same code path, minutes on a CPU).
#
#   bash benchmarks/gpu_check.sh NAME [-S key=value ...]
#     The CUDA tests, then the whole pipeline timed on the GPU with the given -S overrides
#     (benchmarks/pipeline_time.py) -> reports/benchmarks/NAME.json (+ .log).
#
# Packages the machine lacks may lie as wheels in .whl/ (benchmarks/gpu_wheels.sh fetches them):
# they are installed under /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1

if [[ $# -gt 0 ]]; then  # the whole pipeline, timed
  set -e
  name=$1; shift
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  tests=0
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py || tests=$?  # the timing runs either way
  python3 benchmarks/pipeline_time.py --name "$name" "$@"
  exit $tests
fi

# sizes: the real run, or toy ones for the CPU dry run
dev=cuda out=reports/benchmarks bs=256 bs_default=256 prof_default="" warm=10 steps=20 psteps=10 psteps_vit=5
img64=2048 img224=1024 tt_steps=40 tt_warm=5 workers=8 batches="32000 64000"
if [[ -n ${GPU_CHECK_DRY:-} ]]; then
  dev=cpu out=${GPU_CHECK_DRY_DIR:-/tmp/gpu_check_dry} bs=4 bs_default=16 prof_default="--batch-size 16" warm=1 steps=1 psteps=1 psteps_vit=1
  img64=200 img224=40 tt_steps=1 tt_warm=1 workers=2 batches="2048"
fi
mkdir -p "$out"
ws=/tmp/gpu_check_ws  # synthetic data, made once per size and shared by the runs
log=$out/gpu_check_suite.log
budget=${GPU_CHECK_BUDGET:-540}
t0=$SECONDS
: > "$log"
failed=()

# step NAME SECONDS COMMAND...: run COMMAND under a timeout (cut to the budget left), logged; skipped
# when less than 20 s of the budget is left, or when GPU_CHECK_ONLY is set and does not name it
step() {
  local name=$1 limit=$2; shift 2
  if [[ -n ${GPU_CHECK_ONLY:-} && " $GPU_CHECK_ONLY " != *" $name "* ]]; then
    return 0
  fi
  local left=$(( budget - (SECONDS - t0) ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then
    echo "== $name: skipped, ${left}s of the budget left" | tee -a "$log"
    failed+=("$name(skipped)")
    return 0
  fi
  echo "== $name (timeout ${limit}s, at $(( SECONDS - t0 ))s): $*" | tee -a "$log"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $(( SECONDS - start ))s" | tee -a "$log"
  (( rc == 0 )) || failed+=("$name(rc=$rc)")
}

pack() {  # results back through $OUT (at most 8 files there, 16 MiB each)
  if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then
    tar czf "$OUT/gpu_check_results.tgz" "$out"/loss_memory_"$dev".json "$out"/profile_"$dev"_*.json \
      "$out"/train_throughput_"$dev"_*.json "$out"/gpu_summary.md "$log" 2>/dev/null
    tar czf "$OUT/gpu_check_traces.tgz" "$out"/*.trace.json.gz 2>/dev/null
    cp "$log" "$OUT/"
    ls -la "$OUT"
  fi
}
trap pack EXIT

if [[ $dev == cuda ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit,clocks.max.sm --format=csv 2>&1 | tee -a "$log"
fi
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee -a "$log"
python3 -c "import open_clip, pydantic, pipeline.loop; print('imports ok: open_clip', open_clip.__version__)" 2>&1 | tee -a "$log"

P="python3 benchmarks/profile_step.py --device $dev --data $ws --out-dir $out"
T="python3 benchmarks/train_throughput.py --device $dev --steps $tt_steps --warmup $tt_warm --workers $workers"
step loss_memory 60 python3 benchmarks/loss_memory.py --device "$dev" --batches $batches --out "$out/loss_memory_$dev.json"
# the default model at params.yaml's batch (128), as the train stage runs it
step profile_default 120 $P --model default $prof_default --images "$img64" --warmup "$warm" \
  --steps "$steps" --profile-steps "$psteps" --trace
# 224 px batches (38 MB of uint8 at 256) come from DataLoader workers, as in train_throughput
step profile_vitb32 150 $P --model vitb32 --batch-size "$bs" --images "$img224" --warmup "$warm" \
  --steps "$steps" --profile-steps "$psteps_vit" --workers "$workers" --trace
step throughput_vitb32 180 $T --model vitb32 --batch-size "$bs" --images "$img224" \
  --out "$out/train_throughput_${dev}_vitb32.json"
step throughput_default 150 $T --batch-size "$bs_default" --images "$img64" \
  --out "$out/train_throughput_${dev}_default.json"
# A/B of the default model: what each overhead costs (timing only, no profiler)
step default_step_checks 60 $P --model default $prof_default --images "$img64" --warmup "$warm" \
  --steps "$steps" --profile-steps 0 --checks step --name "profile_${dev}_default_stepchecks"
step default_workers4 60 $P --model default $prof_default --images "$img64" --warmup "$warm" \
  --steps "$steps" --profile-steps 0 --workers 4 --name "profile_${dev}_default_workers4"
if [[ -z ${GPU_CHECK_DRY:-} ]]; then
  # docs/scale.md: ViT-B/16 at batch 256, and at 64, a 64k global batch's share of each of 1,000 GPUs
  step profile_vitb16 120 $P --model vitb16 --batch-size "$bs" --images "$img224" --warmup "$warm" \
    --steps "$steps" --profile-steps 0 --workers "$workers"
  step profile_vitb16_b64 60 $P --model vitb16 --batch-size 64 --images "$img224" --warmup "$warm" \
    --steps "$steps" --profile-steps 0 --workers "$workers" --name "profile_${dev}_vitb16_b64"
  # torch.compile, and CUDA graphs through its reduce-overhead mode: the default step is bound by
  # host dispatch (docs/performance.md), which only graphs remove
  step default_compile 150 $P --model default $prof_default --images "$img64" --warmup 30 \
    --steps "$steps" --profile-steps 5 --compile --name "profile_${dev}_default_compile"
  step default_cudagraphs 150 $P --model default $prof_default --images "$img64" --warmup 30 \
    --steps "$steps" --profile-steps 0 --compile reduce-overhead --name "profile_${dev}_default_cudagraphs"
fi
python3 benchmarks/gpu_summary.py "$out" 2>&1 | tee -a "$log"
if [[ -z ${GPU_CHECK_DRY:-} ]] && (( budget - (SECONDS - t0) >= 200 )) && python3 -c "import mlflow" 2>/dev/null; then
  step test_cuda 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
fi
echo "gpu_check: $(( SECONDS - t0 ))s; not passed: ${failed[*]:-none}" | tee -a "$log"
