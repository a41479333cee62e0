"""Where the retrieval stage gets its weights, and the retrieval model they go into.

`--checkpoint` may name:
- a released-layout file (docs/METHOD.md §7): the released `ALBEF.pth`,
  `ALBEF_4M.pth`, `flickr30k.pth`, `mscoco.pth` (text keys with or without
  `bert.`), or our `export/albef.pth`; `{"model": state_dict, ...}` or a bare
  state dict;
- a training run folder: its `export/albef.pth` when present, else its newest
  complete DeepSpeed checkpoint;
- one DeepSpeed checkpoint folder of our trainer (`checkpoints/stepNNN/`,
  ZeRO-0/1/2: the engine's `mp_rank_00_model_states.pt` holds the whole module).
  A ZeRO-3 checkpoint holds only partitions: export it first.

Everything ends in `model.weights.released.load_albef_state_dict`, which resizes the
position embeddings to the configured resolution, accepts the expected
differences (no `idx_queue` in a pretraining checkpoint, an MLM head that a
retrieval model does not have) with reasons, and refuses anything else.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from model.albef import ALBEF, text_settings_from_tokenizer
from model.weights.released import LoadReport, export_albef_state_dict, load_albef_state_dict
from model.engine.checkpointing import EXTRA_STATE, newest_complete
from model.engine.export import EXPORT_NAME

ZERO012_MODULE_FILE = "mp_rank_00_model_states.pt"
ZERO3_MODULE_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def retrieval_model_config(model_cfg: dict, tokenizer) -> dict:
    """A `model` section for the retrieval stage: retrieval mode, ids from the tokenizer,
    and no `init` weights (the checkpoint supplies every tensor)."""
    mcfg = copy.deepcopy(model_cfg)
    mcfg["retrieval"] = True
    mcfg["vision"]["init"] = None
    mcfg["text"]["init"] = None
    mcfg["text"].update(text_settings_from_tokenizer(tokenizer))
    return mcfg


def _load_file(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad or foreign pickle
        raise ValueError(f"--checkpoint {path}: cannot be read as a PyTorch checkpoint ({err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"--checkpoint {path}: holds a {type(state).__name__}, expected a state dict "
                         f"or {{'model': state_dict}}")
    return state


def _deepspeed_state(tag_dir: Path) -> dict:
    """Released-layout state dict of one of our trainer's ZeRO-0/1/2 DeepSpeed checkpoints."""
    module_file = tag_dir / ZERO012_MODULE_FILE
    if not module_file.is_file():
        if (tag_dir / ZERO3_MODULE_FILE).is_file():
            raise ValueError(f"--checkpoint {tag_dir}: a ZeRO-3 checkpoint holds only parameter partitions; "
                             f"use the run's export/{EXPORT_NAME} (written at the end of training)")
        raise FileNotFoundError(f"--checkpoint {tag_dir}: no {ZERO012_MODULE_FILE} (not a DeepSpeed checkpoint)")
    # Our own trainer's files: DeepSpeed pickles its config objects, so a full unpickle is needed.
    engine_state = torch.load(module_file, map_location="cpu", weights_only=False)
    extra = torch.load(tag_dir / EXTRA_STATE, map_location="cpu", weights_only=False)
    src_cfg = copy.deepcopy(extra["config"]["model"])
    src_cfg["vision"]["init"] = None
    src_cfg["text"]["init"] = None
    source = ALBEF(src_cfg)
    module_state = dict(engine_state["module"])
    for name, p in source.named_parameters():
        if p.dim() == 0 and name in module_state:  # the trainer gives 0-d parameters shape [1] for DeepSpeed
            module_state[name] = module_state[name].reshape(())
    source.load_state_dict(module_state, strict=True)
    return {"model": export_albef_state_dict(source)}


def read_checkpoint(path: str | Path) -> tuple[dict, str]:
    """(checkpoint dict in the released layout, the file it came from)."""
    path = Path(path)
    if path.is_file():
        return _load_file(path), str(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or folder")
    export = path / "export" / EXPORT_NAME
    if export.is_file():
        return _load_file(export), str(export)
    tag = path if (path / EXTRA_STATE).is_file() else newest_complete(path / "checkpoints")
    if tag is None:
        raise FileNotFoundError(f"--checkpoint {path}: neither export/{EXPORT_NAME} nor a complete "
                                f"checkpoint under checkpoints/")
    return _deepspeed_state(tag), str(tag)


def load_retrieval_weights(model: ALBEF, path: str | Path) -> tuple[LoadReport, str]:
    """Load `--checkpoint` into a retrieval model; returns the load report and the source file."""
    state, source = read_checkpoint(path)
    report = load_albef_state_dict(model, state)
    report.source = source
    return report, source
