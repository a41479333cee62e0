"""Evaluation entry for every task: the config's `task:` selects the recipe (model/tasks/).

    python -m model.evaluate --config configs/retrieval_flickr.yaml --checkpoint CKPT \
        [--split test] [--output JSON] [--device cpu|cuda] [--save-scores] [--save-heatmaps N] [key=value ...]
    torchrun --nproc_per_node N -m model.evaluate ...    (the work is split across ranks)

`--checkpoint` is a released-layout file, one of our exports, a run folder or a
checkpoint folder. Rank 0 writes the task's result JSON (default: next to the
checkpoint, `<checkpoint>.<config>_<split>.json`) and prints its summary.
Nothing imports this file.
"""
import sys

from model.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
