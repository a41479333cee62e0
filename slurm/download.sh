#!/bin/bash
# The download stage (img2dataset -> WebDataset shards) as a Slurm array job:
# task I of N downloads slice I/N of the source's shards into the shared output
# folder (shard ids are global, so slices never collide), then rebuilds the
# manifest. Re-running the array resumes: finished shards are skipped.
#
# Submit with slurm/submit_download.sh (stages the list once, then the array):
#   slurm/submit_download.sh cc3m /lists/Train_GCC-training.tsv /data/cc3m 16
# or by hand, from the repository root:
#   jid=$(ALBEF_SOURCE=cc3m ALBEF_INPUT=... ALBEF_OUTPUT=/data/cc3m ALBEF_STAGE_ONLY=1 \
#         sbatch --parsable slurm/download.sh)
#   ALBEF_SOURCE=cc3m ALBEF_INPUT=... ALBEF_OUTPUT=/data/cc3m \
#         sbatch --dependency=afterok:$jid --array=0-15 slurm/download.sh
#
# Environment:
#   ALBEF_SOURCE      cc3m | cc12m | sbu | coco | vg | flickr30k (required)
#   ALBEF_INPUT       the source's list file (required)
#   ALBEF_OUTPUT      shard folder on a filesystem every node sees (required)
#   ALBEF_IMAGE_ROOT  folder relative image paths are under (coco, vg)
#   ALBEF_STAGE_ONLY  1: only read the list into the staging folder (run once before the array)
#   ALBEF_DOWNLOAD_ARGS  extra options of `python -m pipeline.download` (e.g. --threads 64)
#   ALBEF_REPO, ALBEF_PYTHON  as in slurm/common.sh
#SBATCH --job-name=albef-download
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%A_%a.out

set -uo pipefail
ALBEF_REPO=${ALBEF_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
cd "$ALBEF_REPO" || exit 2
if [ -z "${ALBEF_PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then ALBEF_PYTHON=.venv/bin/python; else ALBEF_PYTHON=python3; fi
fi
: "${ALBEF_SOURCE:?set ALBEF_SOURCE (cc3m, cc12m, sbu, coco, vg, flickr30k)}"
: "${ALBEF_INPUT:?set ALBEF_INPUT to the source list file}"
: "${ALBEF_OUTPUT:?set ALBEF_OUTPUT to the shard folder}"

ARGS=(--source "$ALBEF_SOURCE" --input "$ALBEF_INPUT" --output "$ALBEF_OUTPUT"
      --processes "${SLURM_CPUS_PER_TASK:-1}")
[ -n "${ALBEF_IMAGE_ROOT:-}" ] && ARGS+=(--image-root "$ALBEF_IMAGE_ROOT")
if [ "${ALBEF_STAGE_ONLY:-0}" = 1 ]; then
    ARGS+=(--stage-only)
elif [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    COUNT=${SLURM_ARRAY_TASK_COUNT:-$((SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1))}
    ARGS+=(--slice "$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))/$COUNT")
fi
# shellcheck disable=SC2206
[ -n "${ALBEF_DOWNLOAD_ARGS:-}" ] && ARGS+=($ALBEF_DOWNLOAD_ARGS)

echo "albef-download: $(date -Is) $ALBEF_PYTHON -m pipeline.download ${ARGS[*]}"
exec "$ALBEF_PYTHON" -m pipeline.download "${ARGS[@]}"
