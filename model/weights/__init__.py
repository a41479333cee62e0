"""Weights in foreign layouts, and the builders that load them.

- `released.py`: the released ALBEF checkpoint layout <-> ours (load, export),
  Hugging Face BERT into the text/fusion layers, timm/DeiT ViT weights with the
  position embedding resized (docs/METHOD.md §7).
- `files.py`: where weights come from (a `.pth`, a run folder, a DeepSpeed checkpoint).
- `load.py`: `load_albef` (model + image transform + tokenizer from a run, a checkpoint of any ZeRO
  stage via `deepspeed_files.py`, a `.pth`, `.safetensors` or HF-style folder); `export_formats.py`
  writes those formats (`python -m model.export`).

Models are built with random weights; `build_albef` then loads the configured
`vision.init` / `text.init` weights, so a model's `__init__` never reads files.
"""
from __future__ import annotations

import logging

from model.albef import ALBEF
from model.weights.released import load_hf_bert, load_vit_weights

log = logging.getLogger(__name__)


def build_albef(cfg: dict, global_batch_size: int | None = None) -> ALBEF:
    """ALBEF from a `model` section, with `vision.init` / `text.init` weights loaded when set.

    The load reports are kept in `model.init_reports` (and logged).
    """
    model = ALBEF(cfg, global_batch_size=global_batch_size)
    s = model.settings
    model.init_reports = []
    if s.vision.init:
        model.init_reports.append(load_vit_weights(model.visual_encoder, s.vision, s.vision.init))
    if s.text.init:
        model.init_reports.append(load_hf_bert(model.text_encoder, s.text, s.text.init))
    if model.init_reports:
        # the momentum copies were made from the random weights: copy the loaded ones over
        model.copy_online_to_momentum()
    for report in model.init_reports:
        log.info("%s", report)
    return model
