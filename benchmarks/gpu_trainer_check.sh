#!/usr/bin/env bash
# The trainer on one GPU at Qwen2.5-1.5B's shape (random weights), in one prepared run on a GPU
# machine with no network (H100/H200): installs the carried wheels, then
#   a. `luffy-fast train` for a few steps, ZeRO-2, bf16, HF-generate rollouts, on a generated
#      JSONL; checks its losses and gradient norms are finite, and that the fused path's gradient
#      on one micro-batch matches the reference backend's;
#   b. the update alone (forward, backward, optimizer step; gradient checkpointing) with the fused
#      head, the usual path (full logits + naive loss) and Liger's GRPO loss: tokens/s and peak
#      memory at 4k/16k/32k tokens per micro-batch, allocated memory from step to step, and the
#      longest single sequence each trains (4k, 8k, ..., 128k until out of memory); the fused
#      head with 16-bit kept logits (`logits_dtype: input`) too, tokens/s and memory only (and,
#      when TRAINER_CHECK_STAGES names update-fused_liger, with Liger's layer kernels); and the
#      fused and naive heads under a 78 GiB cap (an 80 GB card's), each at the fewest
#      checkpointed layers that fit (benchmarks/checkpoint_fit.py: the saved memory spent on speed);
#   c. everything to $OUT (or ./gpu_results): trainer_check.json, trainer_check.txt (the table),
#      trainer_check.log, train_metrics.jsonl; the table is printed last.
#
#   bash scripts/collect_device_wheels.sh                 # here, once: .device-wheels/ (~6 MiB)
#   bash benchmarks/gpu_trainer_check.sh                  # on the GPU machine, from the repo root
#   BENCH_DRY_RUN=1 bash benchmarks/gpu_trainer_check.sh  # the same stages at toy sizes on a CPU
#
# Budget: every stage runs under `timeout`, sized from one overall budget (GPU_CHECK_BUDGET_S,
# default 465 s) minus what the later stages need (benchmarks/stages.sh), so the script ends in
# under 8 minutes even when a stage hangs; stages append their measurements as they go, so a stage
# cut short keeps them. TRAINER_CHECK_STAGES picks stages (default all; the update stages need
# prepare's model) and TRAINER_CHECK_CAPS overrides the caps ("name:seconds ...").
# Knobs: BENCH_MAX_SEQ (longest probe, default 131072), LIGER_COMPILED (default 1 on CUDA),
# BENCH_FIT_CAP_GIB (the fit stages' memory cap, default 78),
# DEVICE_WHEELS (default .device-wheels, "none" in a dry run: skips installing), TRAINER_CHECK_WORK (working
# folder, default /tmp/luffy-trainer-check: the model and a checkpoint, ~30 GB at full size).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${OUT:-$ROOT/gpu_results}
WORK=${TRAINER_CHECK_WORK:-/tmp/luffy-trainer-check}
SITE=${TRAINER_CHECK_SITE:-/tmp/luffy-trainer-site}
[[ "${BENCH_DRY_RUN:-0}" == 1 ]] && WHEELS=${DEVICE_WHEELS:-none} || WHEELS=${DEVICE_WHEELS:-$ROOT/.device-wheels}
PY=${PYTHON:-python3}
# an absolute path (stages run from $WORK), without resolving links (a venv's python is one)
[[ $PY == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
BUDGET=${GPU_CHECK_BUDGET_S:-465}
START=$(date +%s)
mkdir -p "$OUT_DIR"
mkdir -p "$WORK"
(cd "$WORK" && rm -rf model train_run results train.jsonl train.yaml)  # an earlier run's
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
[[ "${BENCH_DRY_RUN:-0}" == 1 ]] && export BENCH_DRY_RUN=1 || export DS_ACCELERATOR=cuda

STAGE_TAG=trainer_check
# update-fused_half last: the targets' numbers come first when the budget runs short;
# update-fused_liger (model.liger_kernels, CUDA only) runs when named in TRAINER_CHECK_STAGES
# fit-*: each head within BENCH_FIT_CAP_GIB (default 78) at the fewest checkpointed layers that fit
STAGE_ORDER="prepare train check-train grad-parity update-fused update-naive update-liger fit-fused fit-naive update-fused_half update-fused_liger"
STAGE_CAPS=${TRAINER_CHECK_CAPS:-"prepare:90 train:180 check-train:30 grad-parity:90 update-fused:120 update-naive:90 update-liger:120 fit-fused:90 fit-naive:90 update-fused_half:60 update-fused_liger:60"}
STAGES=${TRAINER_CHECK_STAGES:-${STAGE_ORDER% update-fused_liger}}
STAGE_DIR=$WORK  # stages run from $WORK, so the luffy_fast installed in $SITE is the one imported
# shellcheck source=benchmarks/stages.sh
source "$ROOT/benchmarks/stages.sh"

main() {
  log "results in $OUT_DIR, working folder $WORK, dry run: ${BENCH_DRY_RUN:-0}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader

  # 0. The carried wheels (scripts/collect_device_wheels.sh) into $SITE; luffy-fast itself is
  # built from this tree when setuptools can (offline), else the carried wheel is used.
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  if [[ $WHEELS != none ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    rm -rf "$SITE"
    local others=() own=()
    for wheel in "$WHEELS"/*.whl; do
      [[ $(basename "$wheel") == luffy_fast-* ]] && own+=("$wheel") || others+=("$wheel")
    done
    timeout 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$SITE" "${others[@]}" || log "installing the carried wheels FAILED"
    local src="$WORK/src"
    mkdir -p "$src" && cp -r luffy_fast kernels setup.py pyproject.toml README.md "$src"/ 2>/dev/null
    if timeout 120 $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --target "$SITE" "$src" >"$WORK/luffy_install.log" 2>&1; then
      log "luffy-fast: built from this tree"
    elif (( ${#own[@]} )) && timeout 60 $PY -m pip install -q --no-index --no-deps --no-compile \
        --target "$SITE" "${own[@]}"; then
      log "luffy-fast: the carried wheel (this tree did not build: $WORK/luffy_install.log)"
    fi
    rm -rf "$src"
    export PYTHONPATH="$SITE:$PYTHONPATH"
    log "installed: $(ls "$SITE" | grep -c dist-info) distributions in $SITE"
  fi
  (cd "$WORK" && $PY - <<'EOF'
import importlib
for name in ("deepspeed", "math_verify", "liger_kernel", "pydantic", "luffy_fast.kernels"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '')} from {module.__file__}")
    except Exception as error:
        print(f"  {name}: NOT importable ({type(error).__name__}: {error})")
EOF
  )

  local bench=($PY -m benchmarks.trainer_update)
  # a. The train command, then its metrics; the gradient on one micro-batch, fused vs reference.
  run_stage prepare "${bench[@]}" prepare --work "$WORK"
  run_stage train $PY -m luffy_fast train --config "$WORK/train.yaml"
  run_stage check-train "${bench[@]}" check-train --work "$WORK"
  [[ -f $WORK/train_run/metrics.jsonl ]] && cp "$WORK/train_run/metrics.jsonl" "$OUT_DIR/train_metrics.jsonl"
  rm -rf "$WORK/train_run/checkpoints"  # ~20 GB at full size; the metrics are what is kept
  run_stage grad-parity "${bench[@]}" grad-parity --work "$WORK"
  # b. The update alone, one process per loss head.
  run_stage update-fused "${bench[@]}" update --impl fused --work "$WORK"
  run_stage update-naive "${bench[@]}" update --impl naive --work "$WORK"
  run_stage update-liger "${bench[@]}" update --impl liger --work "$WORK"
  # the memory the fused head saves, spent on fewer recomputes (model.checkpointed_layers)
  run_stage fit-fused "${bench[@]}" fit --impl fused --work "$WORK"
  run_stage fit-naive "${bench[@]}" fit --impl naive --work "$WORK"
  run_stage update-fused_half "${bench[@]}" update --impl fused_half --work "$WORK"
  run_stage update-fused_liger "${bench[@]}" update --impl fused_liger --work "$WORK"
  # c. One JSON and the table, last.
  log "stages: $(printf '%s; ' "${STATUS[@]}")"
  log "total $(( $(date +%s) - START )) s; files in $OUT_DIR"
  (cd "$WORK" && timeout 60 "${bench[@]}" report --work "$WORK" --out "$OUT_DIR")
}

main 2>&1 | tee "$OUT_DIR/trainer_check.log"
