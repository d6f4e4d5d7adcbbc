# Stage timing shared by the GPU scripts (sourced, not run). A script sets
#   STAGE_TAG   its log prefix             STAGE_ORDER  its stage names, in order
#   STAGE_CAPS  "name:seconds ..."         STAGES       the names to run (default: all; spaces or commas)
#   BUDGET      seconds for all of them    START        $(date +%s) at its start
# and calls `run_stage NAME COMMAND...`. A stage may take its cap while the budget holds the caps of
# every stage still to run; otherwise each gets its cap's share of the time left. So one hang
# cannot eat the time of the stages after it, and a stage that ends early hands its time on.
# STATUS collects "name: ok | TIMED OUT after Ns | exit N | skipped".

STATUS=()

log() { echo "[$STAGE_TAG +$(( $(date +%s) - START ))s] $*"; }

stage_selected() { [[ " ${STAGES:-$STAGE_ORDER} " == *" $1 "* || ",${STAGES:-}," == *",$1,"* ]]; }

stage_cap() {
  local entry
  for entry in $STAGE_CAPS; do [[ ${entry%%:*} == "$1" ]] && { echo "${entry#*:}"; return; }; done
  echo 60
}

# Seconds stage $1 may take now: its cap, or, when the time left is less than the caps of this
# and the later selected stages add up to, its cap's share of the time left.
stage_limit() {
  local name=$1 remaining=0 seen=0 stage cap
  for stage in $STAGE_ORDER; do
    [[ $stage == "$name" ]] && seen=1
    (( seen )) && stage_selected "$stage" && remaining=$(( remaining + $(stage_cap "$stage") ))
  done
  local left=$(( BUDGET - ($(date +%s) - START) ))
  cap=$(stage_cap "$name")
  (( remaining > left )) && cap=$(( cap * left / remaining ))
  echo $(( cap > 5 ? cap : 5 ))
}

# run_stage NAME COMMAND...: the command under its stage's timeout (from $STAGE_DIR when set; its
# output into $STAGE_OUTPUT when set, e.g. `STAGE_OUTPUT=speed.log run_stage speed ...`).
run_stage() {
  local name=$1 limit rc
  shift
  if ! stage_selected "$name"; then STATUS+=("$name: skipped"); return 0; fi
  limit=$(stage_limit "$name")
  log "$name (timeout ${limit}s)"
  if [[ -n ${STAGE_OUTPUT:-} ]]; then
    (cd "${STAGE_DIR:-.}" && timeout -k 10 "$limit" "$@") >"$STAGE_OUTPUT" 2>&1
  else
    (cd "${STAGE_DIR:-.}" && timeout -k 10 "$limit" "$@")
  fi
  rc=$?
  case $rc in 0) STATUS+=("$name: ok") ;; 124|137) STATUS+=("$name: TIMED OUT after ${limit}s") ;;
    *) STATUS+=("$name: exit $rc") ;; esac
  log "$name: ${STATUS[-1]#*: }"
  return $rc
}
