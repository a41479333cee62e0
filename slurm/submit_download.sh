#!/bin/bash
# Submit the download stage of one source: a staging job, then an array of
# SLICES tasks (default 8) that starts when staging succeeded.
#
#   slurm/submit_download.sh SOURCE INPUT OUTPUT [SLICES] [sbatch options...]
#   slurm/submit_download.sh cc3m  /lists/Train_GCC-training.tsv /data/cc3m  16
#   slurm/submit_download.sh cc12m /lists/cc12m.tsv              /data/cc12m 64 --partition=cpu
#   ALBEF_IMAGE_ROOT=/datasets/coco slurm/submit_download.sh coco /ann/coco.json /data/coco 4
#
# Run from the repository root. Prints the two job ids. Re-submitting resumes.
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,9p' "$0" >&2
    exit 2
fi
SOURCE=$1 INPUT=$2 OUTPUT=$3
SLICES=${4:-8}
shift $(( $# < 4 ? $# : 4 ))
if ! [[ "$SLICES" =~ ^[1-9][0-9]*$ ]]; then
    echo "submit_download: SLICES must be a positive integer, got '$SLICES'" >&2
    exit 2
fi
SCRIPT=$(cd "$(dirname "$0")" && pwd)/download.sh
export ALBEF_SOURCE=$SOURCE ALBEF_INPUT=$INPUT ALBEF_OUTPUT=$OUTPUT
STAGE=$(ALBEF_STAGE_ONLY=1 sbatch --parsable --job-name="albef-stage-$SOURCE" "$@" "$SCRIPT")
ARRAY=$(ALBEF_STAGE_ONLY=0 sbatch --parsable --job-name="albef-dl-$SOURCE" --dependency="afterok:${STAGE%%;*}" \
        --array="0-$((SLICES - 1))" "$@" "$SCRIPT")
echo "staging job ${STAGE%%;*}, download array ${ARRAY%%;*} ($SLICES slices) -> $OUTPUT"
