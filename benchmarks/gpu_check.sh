#!/usr/bin/env bash
# The whole GPU measurement of issue 15 in one call of at most 8 minutes, on a machine with CUDA
# jax, torch and transformers and no network (see benchmarks/README.md, "One GPU check"):
#   1. toy model, float32, sdjax against diffusers float32: full float32 (sdjax's default), then
#      TF32 in both (matmul_precision=default), each with its largest pixel difference
#   2. an SD 1.5-shaped random-weight folder, written by diffusers (nothing is downloaded)
#   3. SD 1.5 shape, 512x512, 50 steps, batch 16: sdjax bfloat16 against diffusers float16, cold
#      compile, warm start of a fresh process through the compilation cache, FLOPs and MFU
#   4. the same at batch 1
#   5. (CN=1) the SD 1.5 shape at batch 1 through a random ControlNet, against diffusers'
#      StableDiffusionControlNetPipeline (issue 25)
#   6. (XL=1) the MLPerf-like SDXL workload: SDXL base shape, 1024x1024, 20 Euler steps, CFG 8,
#      sdjax bfloat16 against diffusers float16 ($XL_SHAPE, $XL_SIZE, $XL_STEPS, $XL_BATCH)
# then prints the table (benchmarks/gpu_table.py). Each step has its own timeout, cut to the
# time left, and logs to $OUT/all.log, so a step that runs long still leaves the others'
# figures. The runs append their rows to $OUT/RESULTS.md (copy them into benchmarks/RESULTS.md)
# and write $OUT/{toy_f32,toy_tf32,b16,b1}.json.
#
# Run it from the repository root. Wheels the machine lacks (diffusers, importlib_metadata; a
# flax to fall back on) travel in .whl/ and are installed into /tmp/site, no network needed.
# A dry run on a CPU (about 4 minutes on 2 busy cores):
#   OUT=/tmp/gpucheck SHAPE=tiny SIZE=32 STEPS=2 B16=2 TOY_STEPS=2 TOY_BATCH=2 \
#       bash benchmarks/gpu_check.sh
# (add XL=1 XL_SHAPE=sdxl-tiny XL_SIZE=32 XL_STEPS=2 for the SDXL step on a tiny shape, CN=1 for
# the ControlNet step)
set -u
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
OUT=${OUT:-/tmp/gpucheck}; mkdir -p "$OUT"; LOG="$OUT/all.log"
SHAPE=${SHAPE:-sd15}; SIZE=${SIZE:-512}; STEPS=${STEPS:-50}; B16=${B16:-16}
TOY_STEPS=${TOY_STEPS:-20}; TOY_BATCH=${TOY_BATCH:-8}; PY=${PY:-python3}
MODELS=${MODELS:-/tmp/sdjax-models}
BUDGET=${BUDGET:-470}  # seconds for everything, under the 8 minutes one call may take
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
step() {  # step CAP NAME cmd...: run with timeout min(CAP, time left), log everything
  local cap=$1 name=$2; shift 2
  local t; t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then log "SKIP $name: $t s left"; return 1; fi
  log "START $name (timeout ${t}s)"
  timeout "$t" bash -c '"$@"' _ "$@" >>"$LOG" 2>&1; local rc=$?  # functions run too
  log "END $name rc=$rc"; return $rc
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >>"$LOG" 2>&1
SITE=""
wheels=()
if [ "${SKIP_WHEELS:-0}" != 1 ]; then
  for w in .whl/*.whl; do
    case $(basename "$w") in flax-*|"*.whl") ;; *) wheels+=("$w");; esac  # flax: a fallback
  done
fi
if [ ${#wheels[@]} -gt 0 ] && $PY -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target /tmp/site "${wheels[@]}" >>"$LOG" 2>&1; then
  SITE=/tmp/site:
fi
export PYTHONPATH="$SITE$PWD"
versions() { $PY -c "import sys,jax,flax,torch,diffusers,transformers,numpy;print('python',sys.version.split()[0],'jax',jax.__version__,'flax',flax.__version__,'torch',torch.__version__,'diffusers',diffusers.__version__,'transformers',transformers.__version__,'numpy',numpy.__version__,jax.devices())" >>"$LOG" 2>&1; }
versions

bench() { "$PY" -m benchmarks.throughput --results "$OUT/RESULTS.md" "$@"; }
toy() {  # toy NAME NOTE [flags]: the float32 parity run
  local name=$1 note=$2; shift 2
  bench --model toy --steps "$TOY_STEPS" --batch "$TOY_BATCH" --dtype float32 \
    --diffusers_dtype float32 --no-warm_start --no-max_batch --repeats 3 \
    --json "$OUT/$name.json" --note "$note" "$@"
}
export OUT PY TOY_STEPS TOY_BATCH; export -f bench toy
if ! step 120 "toy float32, full precision" toy toy_f32 "parity: toy float32 vs diffusers float32, full float32 in both"; then
  if ls .whl/flax*.whl >/dev/null 2>&1; then  # the machine's flax may not fit; try the one brought
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/flax \
        .whl/flax*.whl >>"$LOG" 2>&1
    export PYTHONPATH="$SITE/tmp/flax:$PWD"; versions
    step 120 "toy float32, full precision (flax from .whl)" toy toy_f32 "parity: toy float32 vs diffusers float32, full float32 in both" \
      || { log "sdjax does not run here; stopping"; exit 1; }
  else
    log "sdjax does not run here; stopping"; exit 1
  fi
fi
step 100 "toy float32, TF32" toy toy_tf32 "parity: toy float32 vs diffusers float32, TF32 in both" \
  --matmul_precision default
step 150 "build $SHAPE folder" "$PY" -m benchmarks.models --shape "$SHAPE" --root "$MODELS" || {
  "$PY" -m benchmarks.gpu_table "$OUT" | tee "$OUT/table.md"; exit 1; }
step 300 "$SHAPE batch $B16" bench --model "$SHAPE" --models_dir "$MODELS" --size "$SIZE" \
  --steps "$STEPS" --batch "$B16" --dtype bfloat16 --no-max_batch --repeats 3 \
  --json "$OUT/b16.json" --note "sdjax bf16 vs diffusers fp16, batch $B16"
step 200 "$SHAPE batch 1" bench --model "$SHAPE" --models_dir "$MODELS" --size "$SIZE" \
  --steps "$STEPS" --batch 1 --dtype bfloat16 --no-max_batch --no-warm_start --repeats 3 \
  --json "$OUT/b1.json" --note "sdjax bf16 vs diffusers fp16, batch 1"
if [ "${CN:-0}" = 1 ]; then  # issue 25: ControlNet txt2img (a random ControlNet of the shape)
  step 200 "$SHAPE + ControlNet batch 1" bench --model "$SHAPE" --models_dir "$MODELS" \
    --size "$SIZE" --steps "$STEPS" --batch 1 --dtype bfloat16 --no-max_batch --no-warm_start \
    --repeats 3 --controlnet --json "$OUT/cn1.json" \
    --note "ControlNet: sdjax bf16 vs diffusers fp16 StableDiffusionControlNetPipeline, batch 1"
fi
if [ "${XL:-0}" = 1 ]; then
  XL_SHAPE=${XL_SHAPE:-sdxl}; XL_SIZE=${XL_SIZE:-1024}; XL_STEPS=${XL_STEPS:-20}
  XL_BATCH=${XL_BATCH:-1}
  step 200 "build $XL_SHAPE folder" "$PY" -m benchmarks.models --shape "$XL_SHAPE" \
    --root "$MODELS" &&
  step 300 "$XL_SHAPE batch $XL_BATCH" bench --model "$XL_SHAPE" --models_dir "$MODELS" \
    --size "$XL_SIZE" --steps "$XL_STEPS" --scheduler euler --guidance_scale 8 \
    --batch "$XL_BATCH" --dtype bfloat16 --no-max_batch --no-warm_start --repeats 3 \
    --json "$OUT/sdxl.json" --note "MLPerf-like SDXL: sdjax bf16 vs diffusers fp16"
fi
log "done; $(left) s of the budget left"
"$PY" -m benchmarks.gpu_table "$OUT" | tee "$OUT/table.md"
