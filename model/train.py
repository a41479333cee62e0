"""Training entry for every task: the config's `task:` selects the recipe (model/tasks/).

    deepspeed [--num_gpus N] model/train.py --config configs/pretrain_4m.yaml \
        --deepspeed_config ds_configs/zero2.json [--output-dir DIR] [--resume auto|PATH] \
        [--checkpoint WEIGHTS] [--max-steps N] [--dry-run] [key=value ...]
    srun python model/train.py ...        (rendezvous from the Slurm environment)

The config is read and typed before any process group starts: an unknown or
misspelt key, a wrong type or an impossible value exits 2 with one line naming
the setting. `--dry-run` also reads the DeepSpeed JSON and the training data
(shard manifests or annotation files) and prints the plan (task, world size,
batch, steps, epochs) without building the engine. Nothing imports this file.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # `deepspeed model/train.py` runs this file as a script: make the repo importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
