"""Export a trained ALBEF: `python -m model.export RUN_OR_CHECKPOINT --format albef|safetensors|hf-folder`.

    python -m model.export runs/albef_4m --format hf-folder               # -> runs/albef_4m/export/hf/
    python -m model.export runs/albef_4m/checkpoints/step000002000 --format safetensors --out albef.safetensors

The source may be a run folder, a DeepSpeed checkpoint folder of any ZeRO stage,
a `.pth`, a `.safetensors` export or an HF-style folder; the formats are
described in `model/weights/export_formats.py`. Exit 2 with one line on a bad
source or option. Nothing imports this file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.weights.export_formats import FORMATS, export_weights  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a trained ALBEF (run folder, checkpoint, .pth, "
                                                 ".safetensors or HF-style folder) in another format")
    parser.add_argument("source", help="run folder, checkpoints/<tag> folder (ZeRO-0..3), .pth, .safetensors "
                                       "or HF-style folder")
    parser.add_argument("--format", required=True, choices=FORMATS, help="albef: released-layout .pth; "
                        "safetensors: model.safetensors (+ model config in its metadata); hf-folder: "
                        "config.json + model.safetensors + tokenizer files")
    parser.add_argument("--out", help="output file or folder (default: under the run's export/)")
    parser.add_argument("--config", help="run config YAML, for a released reference checkpoint without one")
    args = parser.parse_args(argv)
    try:
        written = export_weights(args.source, args.format, args.out, args.config)
    except (ValueError, FileNotFoundError) as err:
        print(f"[export] error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"written: {written}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
