#!/bin/bash
# ALBEF pretraining on the 14M mix (the 4M mix + CC12M), paper recipe.
#
#   sbatch slurm/pretrain_14m.sh                      # from the repository root
#   ALBEF_DATA=/data sbatch --nodes=2 slurm/pretrain_14m.sh
#
# Differs from slurm/pretrain_4m.sh only by the config (data mix and schedule:
# configs/pretrain_14m.yaml). Shards under $ALBEF_DATA (cc3m/, sbu/, coco/, vg/,
# cc12m/), or a whole spec in ALBEF_SHARDS. Other variables: slurm/common.sh.
#SBATCH --job-name=albef-14m
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

ALBEF_CONFIG=${ALBEF_CONFIG:-configs/pretrain_14m.yaml}
if [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "${SLURM_SUBMIT_DIR}/slurm/common.sh" ]; then
    source "${SLURM_SUBMIT_DIR}/slurm/common.sh"
else
    source "${ALBEF_REPO:-$(dirname "$0")/..}/slurm/common.sh"
fi
