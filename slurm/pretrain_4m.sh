#!/bin/bash
# ALBEF pretraining on the 4M mix (CC3M + SBU + COCO + VG), paper recipe.
#
#   sbatch slurm/pretrain_4m.sh                       # from the repository root
#   ALBEF_DATA=/data sbatch --nodes=2 slurm/pretrain_4m.sh
#
# Resources: edit the #SBATCH lines or pass sbatch options (one task per GPU;
# the paper used 8 GPUs x 64 = global batch 512; with more GPUs lower
# train.batch_size_per_rank through ALBEF_OVERRIDES to keep it).
# Shards: configs/pretrain_4m.yaml reads them under $ALBEF_DATA (default ./data:
# $ALBEF_DATA/cc3m/*.tar, sbu/, coco/, vg/); or give a whole spec in ALBEF_SHARDS.
# Other variables (output folder, DeepSpeed config, overrides, Python): see
# slurm/common.sh. Requeued jobs resume from the newest checkpoint.
#SBATCH --job-name=albef-4m
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

ALBEF_CONFIG=${ALBEF_CONFIG:-configs/pretrain_4m.yaml}
if [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "${SLURM_SUBMIT_DIR}/slurm/common.sh" ]; then
    source "${SLURM_SUBMIT_DIR}/slurm/common.sh"
else
    source "${ALBEF_REPO:-$(dirname "$0")/..}/slurm/common.sh"
fi
