#!/usr/bin/env bash
# One device call for both GPU checks: the trainer (benchmarks/gpu_trainer_check.sh, issue 12), then
# the fused op (benchmarks/gpu_check.sh, issue 13), each under its own budget. The device returns at
# most 8 files, so every result file is packed into $OUT/gpu_results.tgz; the two short tables are
# also copied beside it and printed last.
#
#   bash scripts/collect_device_wheels.sh     # here, once (.device-wheels/, carried with the call)
#   bash benchmarks/gpu_session.sh            # on a GPU machine: both, ~16 minutes
#
# Both at their full budgets take longer than one 10-minute device call, and a lease of 15 minutes
# holds neither whole: on a lent machine run them as two calls, back to back while it is warm,
# with trimmed budgets (stages then get their caps' share of the time; see benchmarks/stages.sh):
#   run(carry=[".device-wheels"], timeout_s=420,
#       command="SESSION_PARTS=trainer TRAINER_BUDGET_S=390 bash benchmarks/gpu_session.sh")
#   run(carry=[".device-wheels"], timeout_s=380,
#       command="SESSION_PARTS=kernels KERNEL_BUDGET_S=350 bash benchmarks/gpu_session.sh")
#
# Knobs: TRAINER_BUDGET_S and KERNEL_BUDGET_S (default 465 each) for the two scripts;
# TRAINER_CHECK_STAGES / TRAINER_CHECK_CAPS and GPU_CHECK_STAGES / GPU_CHECK_CAPS (and the other
# knobs in each script's header) pick and size their stages; SESSION_PARTS="trainer kernels"
# (either may be left out; they run in the order given). Unpack here: tar -xzf gpu_results.tgz.
set -u
cd "$(dirname "$0")/.."
FINAL=${OUT:-$PWD/gpu_results}
RESULTS=/tmp/gpu_session
rm -rf "$RESULTS" && mkdir -p "$RESULTS/trainer" "$RESULTS/kernels" "$FINAL"
PARTS=${SESSION_PARTS:-trainer kernels}
START=$(date +%s)

pack() {
  tar -czf "$FINAL/gpu_results.tgz" -C "$RESULTS" . 2>/dev/null
  cp "$RESULTS/trainer/trainer_check.txt" "$FINAL/trainer_table.txt" 2>/dev/null
  cp "$RESULTS/kernels/summary.txt" "$FINAL/kernel_table.txt" 2>/dev/null
  true
}
trap pack EXIT

nvidia-smi 2>&1 | head -15 | tee "$RESULTS/nvidia-smi.txt"
for part in $PARTS; do  # in the order given
  case $part in
    trainer) OUT=$RESULTS/trainer GPU_CHECK_BUDGET_S=${TRAINER_BUDGET_S:-465} bash benchmarks/gpu_trainer_check.sh ;;
    kernels) OUT=$RESULTS/kernels GPU_CHECK_BUDGET_S=${KERNEL_BUDGET_S:-465} bash benchmarks/gpu_check.sh \
               2>&1 | tee "$RESULTS/kernels/gpu_check.log" ;;
    *) echo "gpu_session: unknown part $part (trainer, kernels)" ;;
  esac
done
echo "gpu_session: $(( $(date +%s) - START )) s in all; results packed into gpu_results.tgz"
