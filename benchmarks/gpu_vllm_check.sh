#!/usr/bin/env bash
# The vLLM rollout engine on one GPU (tensor_parallel_size 1), the first check to run on a GPU
# machine that has vLLM (pip install -e ".[vllm]"). NOT YET RUN: our GPU machines cannot install
# vLLM's CUDA wheel, so the sleep mode, the memory it frees and the sync at bf16/fp32 on CUDA
# have only been read from vLLM's source. Stages (benchmarks/vllm_check.py), each in its own
# process with an initialized nccl process group, as the trainer has:
#   prepare   a random Qwen2 of Qwen2.5-0.5B's shape (short vocabulary) and a tokenizer;
#   level2    start, generate, score vs transformers, perturb the weights, sleep (level 2, the
#             default) and measure the memory freed, allocate 45 % of the GPU and free it, sync,
#             wake, score again (must match), a second sleep/sync/wake, close (group kept?);
#   level1    the same at sleep level 1;
#   restart   start, sleep, close, then a second sleep-mode engine in the same process;
#   report    $OUT/vllm_check.json and vllm_check.txt (the table, printed last).
#
#   bash benchmarks/gpu_vllm_check.sh                  # on the GPU machine, from the repo root
#   BENCH_DRY_RUN=1 bash benchmarks/gpu_vllm_check.sh  # the same stages at toy size on a CPU
#
# What to look for: sleep1_freed_gib close to engine_gib; allocated_45_percent true;
# gap_same_weights and gap_after_sync* small (fp32: <= 1e-3; VLLM_CHECK_DTYPE=bfloat16: ~0.1),
# gap_before_sync large; group_kept true; restart ok (else its error names the cause).
# Every stage runs under `timeout` (VLLM_CHECK_STAGE_S, default 420 s; start-up on a GPU is
# ~1-2 min with CUDA graphs captured); results go to $OUT (default ./gpu_results).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${OUT:-$ROOT/gpu_results}
WORK=${VLLM_CHECK_WORK:-/tmp/luffy-vllm-check}
PY=${PYTHON:-python3}
LIMIT=${VLLM_CHECK_STAGE_S:-420}
START=$(date +%s)
mkdir -p "$OUT_DIR" "$WORK"
rm -rf "$WORK/results" "$WORK/model"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Stage timing (benchmarks/stages.sh): each stage may take VLLM_CHECK_STAGE_S; no overall budget.
STAGE_TAG=vllm_check
STAGE_ORDER="prepare level2 level1 restart"
STAGE_CAPS="prepare:$LIMIT level2:$LIMIT level1:$LIMIT restart:$LIMIT"
STAGES=${VLLM_CHECK_STAGES:-$STAGE_ORDER}
BUDGET=$(( 4 * LIMIT ))
# shellcheck source=benchmarks/stages.sh
source "$ROOT/benchmarks/stages.sh"

main() {
  log "results in $OUT_DIR, working folder $WORK, dry run: ${BENCH_DRY_RUN:-0}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
  # With Triton present (CUDA) vLLM runs its V2 model runner by default, the CPU tests its V1:
  # VLLM_USE_V2_MODEL_RUNNER=0 reruns this check on V1
  log "VLLM_USE_V2_MODEL_RUNNER=${VLLM_USE_V2_MODEL_RUNNER:-unset (V2 where Triton is present)}"
  $PY -c "import vllm, torch; print('  vllm', vllm.__version__, 'torch', torch.__version__)" \
    || { log "vLLM is not importable: pip install -e '.[vllm]'"; return 1; }
  local check=($PY -m benchmarks.vllm_check)
  run_stage prepare "${check[@]}" prepare --work "$WORK"
  run_stage level2 "${check[@]}" cycle --level 2 --work "$WORK"
  run_stage level1 "${check[@]}" cycle --level 1 --work "$WORK"
  run_stage restart "${check[@]}" restart --work "$WORK"
  log "stages: $(printf '%s; ' "${STATUS[@]}")"
  timeout 60 $PY -m benchmarks.vllm_check report --work "$WORK" --out "$OUT_DIR"
}

main 2>&1 | tee "$OUT_DIR/vllm_check.log"
