# Shared launcher logic of the ALBEF Slurm jobs; sourced by slurm/pretrain_*.sh.
#
# The calling script sets ALBEF_CONFIG (and may set any variable below) and then
# sources this file. Submit from the repository root (or set ALBEF_REPO).
#
# Environment (all optional):
#   ALBEF_REPO        repository root                 [$SLURM_SUBMIT_DIR, else this file's ..]
#   ALBEF_PYTHON      Python with the project installed [$ALBEF_REPO/.venv/bin/python if present, else python3]
#   ALBEF_CONFIG      run config YAML                 [set by the calling script]
#   ALBEF_DS_CONFIG   DeepSpeed JSON                  [ds_configs/zero2.json]
#   ALBEF_OUTPUT      run folder (checkpoints, logs)  [runs/$SLURM_JOB_NAME]
#   ALBEF_SHARDS      training shard spec; overrides data.shards (sources joined by '::')
#   ALBEF_MAX_STEPS   stop after this many optimiser steps (schedule unchanged)
#   ALBEF_OVERRIDES   extra dotted key=value config overrides, space separated
#   ALBEF_SRUN_ARGS   extra srun options
# Nodes, GPUs per node, time limit: the #SBATCH lines of the calling script, or
# sbatch options (`sbatch --nodes=4 slurm/pretrain_4m.sh`). One task per GPU.
#
# Preemption and time limits: the job asks Slurm for USR1 on the batch shell
# before the limit (`#SBATCH --signal=B:USR1@<s>`). The trap below touches the
# run's stop file; every rank sees it at the next step boundary, they agree,
# write a checkpoint and exit; then the job requeues itself (`--requeue`), and
# the new run continues with `--resume auto`. `scancel --signal=USR1 --batch JOB`
# triggers the same path by hand.
#
# SIGTERM (scancel, preemption, the time limit itself) reaches every rank
# directly; each checkpoints at its next step boundary and exits before Slurm's
# SIGKILL (KillWait / GraceTime; docs/FAILURES.md). The batch shell traps TERM so
# that it keeps waiting for srun instead of ending the job under the ranks.

set -uo pipefail

if [ -z "${ALBEF_REPO:-}" ]; then
    if [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "${SLURM_SUBMIT_DIR}/model/train.py" ]; then
        ALBEF_REPO=$SLURM_SUBMIT_DIR
    else
        ALBEF_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    fi
fi
cd "$ALBEF_REPO" || { echo "albef: cannot cd to ALBEF_REPO=$ALBEF_REPO" >&2; exit 2; }
if [ ! -f model/train.py ]; then
    echo "albef: $ALBEF_REPO is not the repository root (no model/train.py); submit from it or set ALBEF_REPO" >&2
    exit 2
fi

if [ -z "${ALBEF_PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then ALBEF_PYTHON=.venv/bin/python; else ALBEF_PYTHON=python3; fi
fi
: "${ALBEF_CONFIG:?the calling script must set ALBEF_CONFIG}"
: "${ALBEF_DS_CONFIG:=ds_configs/zero2.json}"
: "${ALBEF_OUTPUT:=runs/${SLURM_JOB_NAME:-albef}}"
STOP_FILE="$ALBEF_OUTPUT/stop_requested"
mkdir -p "$ALBEF_OUTPUT"

TRAIN_ARGS=(--config "$ALBEF_CONFIG" --deepspeed_config "$ALBEF_DS_CONFIG"
            --output-dir "$ALBEF_OUTPUT" --resume auto --stop-file "$STOP_FILE")
[ -n "${ALBEF_MAX_STEPS:-}" ] && TRAIN_ARGS+=(--max-steps "$ALBEF_MAX_STEPS")
[ -n "${ALBEF_SHARDS:-}" ] && TRAIN_ARGS+=("data.shards=$ALBEF_SHARDS")
# shellcheck disable=SC2206
[ -n "${ALBEF_OVERRIDES:-}" ] && TRAIN_ARGS+=($ALBEF_OVERRIDES)

export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export PYTHONUNBUFFERED=1
# A stale stop file from an earlier run would end this one at its first step.
rm -f "$STOP_FILE"

REQUEUE=0
on_warning() {
    echo "albef: $(date -Is) got the pre-timeout signal: asking ranks to checkpoint and stop"
    REQUEUE=1
    touch "$STOP_FILE"
}
trap on_warning USR1
on_term() {
    echo "albef: $(date -Is) got SIGTERM: the ranks checkpoint at their next step boundary and exit"
}
trap on_term TERM

echo "albef: $(date -Is) job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
     "$ALBEF_PYTHON model/train.py ${TRAIN_ARGS[*]}"

# Each srun task derives its rendezvous from Slurm's variables (model/dist_env.py); torch
# variables inherited from the submitting shell describe some other process.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
# In the background so that the trap runs as soon as the signal arrives
# (bash defers traps until a foreground command returns).
# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 ${ALBEF_SRUN_ARGS:-} "$ALBEF_PYTHON" -u model/train.py "${TRAIN_ARGS[@]}" &
SRUN_PID=$!
while true; do
    wait "$SRUN_PID"
    RC=$?
    if [ "$RC" -gt 128 ] && kill -0 "$SRUN_PID" 2>/dev/null; then
        continue  # woken by the trap; training still running
    fi
    break
done

if [ "$REQUEUE" -eq 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "albef: $(date -Is) training exited with $RC after the stop request; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "albef: $(date -Is) training exited with $RC"
exit "$RC"
