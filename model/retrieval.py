"""Alias kept for existing commands: `python -m model.retrieval evaluate|finetune ...`.

    python -m model.retrieval evaluate ...   == python -m model.evaluate ... (task retrieval)
    deepspeed model/retrieval.py finetune ... == deepspeed model/train.py ... (task retrieval)

The recipe is `model/tasks/retrieval.py`. Nothing imports this file.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # `deepspeed model/retrieval.py` runs this file as a script: make the repo importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.cli import evaluate_main, train_main  # noqa: E402

USAGE = "usage: python -m model.retrieval {evaluate,finetune} [options] (see python -m model.evaluate -h, " \
        "model/train.py -h)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher puts --local_rank=N before the sub-command
    local = [a for a in argv if a.startswith("--local_rank")]
    rest = [a for a in argv if not a.startswith("--local_rank")]
    if not rest or rest[0] not in ("evaluate", "finetune"):
        print(USAGE, file=sys.stderr)
        return 2
    if rest[0] == "evaluate":
        return evaluate_main(rest[1:], task="retrieval")
    return train_main(rest[1:] + local, task="retrieval")


if __name__ == "__main__":
    sys.exit(main())
