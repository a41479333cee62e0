"""Exports of a trained ALBEF: the released `.pth` layout, `model.safetensors`, an HF-style folder.

`python -m model.export RUN_OR_CHECKPOINT --format albef|safetensors|hf-folder [--out PATH]`
(`model/export.py`) reads the weights with `model.weights.load.read_weights`
(run folder, DeepSpeed checkpoint of any ZeRO stage, `.pth`, `.safetensors`,
HF-style folder) and writes:

- `albef`: `{"model": released-layout state dict, "config", "step", "epoch"}`
  (`torch.save`), the file the trainer writes as `export/albef.pth`;
- `safetensors`: `model.safetensors`, the same released-layout tensors, no
  pickle. Metadata (strings): `albef_config` (the model section as JSON),
  `albef_tied` (JSON {alias: stored key}), `step`, `epoch`. safetensors refuses
  tensors that share storage, and the released layout has such aliases (the MLM
  decoder weight is the word embeddings, `cls.predictions.decoder.bias` is
  `cls.predictions.bias`, both `position_ids`): each is stored once and restored
  as the same tensor on reading;
- `hf-folder`: `config.json` (the model section, `text.tokenizer: "."` = this
  folder), `model.safetensors` (as above) and the tokenizer's own files
  (`tokenizer.json`, `vocab.txt`, `tokenizer_config.json`, ...); a folder that
  `load_albef` reads and that can be uploaded to a model hub as it is.

Default `--out` for a run folder: `RUN/export/{albef.pth, model.safetensors, hf}`;
for a checkpoint folder `RUN/checkpoints/TAG`: `RUN/export/TAG/...`; other sources need `--out`.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch

from model.engine.checkpointing import EXTRA_STATE
from model.engine.export import EXPORT_NAME
from model.weights.load import HF_CONFIG_NAME, META_CONFIG, META_TIED, SAFETENSORS_NAME, ALBEFWeights, read_weights

FORMATS = ("albef", "safetensors", "hf-folder")
HF_FOLDER_NAME = "hf"
_DEFAULT_NAMES = {"albef": EXPORT_NAME, "safetensors": SAFETENSORS_NAME, "hf-folder": HF_FOLDER_NAME}


# ---------------------------------------------------------------- safetensors

def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def untie(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors without shared storage, {alias: stored key}): an alias of an earlier key is dropped and
    recorded; a tensor that overlaps another's storage without being the same view is copied."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, value in state.items():
        value = value.detach().cpu()
        view = _storage_key(value)
        if view in views:
            tied[key] = views[view]
            continue
        views[view] = key
        ptr = value.untyped_storage().data_ptr()
        if ptr in storages or not value.is_contiguous():
            value = value.clone(memory_format=torch.contiguous_format)
        storages.add(ptr)
        tensors[key] = value
    return tensors, tied


def write_safetensors(weights: ALBEFWeights, path: Path, model_cfg: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors, tied = untie(weights.state)
    metadata = {"format": "pt", META_CONFIG: json.dumps(model_cfg or weights.model_config, sort_keys=True),
                META_TIED: json.dumps(tied, sort_keys=True),
                "step": json.dumps(weights.step), "epoch": json.dumps(weights.epoch)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def write_hf_folder(weights: ALBEFWeights, folder: Path) -> Path:
    from pipeline.tokenize import load_tokenizer

    cfg = weights.model_config
    tokenizer = load_tokenizer(cfg["text"]["tokenizer"])
    cfg = copy.deepcopy(cfg)
    cfg["text"]["tokenizer"] = "."
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / HF_CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_safetensors(weights, tmp / SAFETENSORS_NAME, cfg)
    tokenizer.save_pretrained(str(tmp))
    if not (tmp / "vocab.txt").is_file():   # transformers 5 writes tokenizer.json only; BERT tools read vocab.txt
        vocab = tokenizer.get_vocab()
        (tmp / "vocab.txt").write_text("".join(t + "\n" for t in sorted(vocab, key=vocab.get)), encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


# ---------------------------------------------------------------- albef (.pth)

def write_albef(weights: ALBEFWeights, path: Path) -> Path:
    """The released layout as the trainer exports it (`model.engine.export`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu() for k, v in weights.state.items()}
    torch.save({"model": state, "config": weights.config, "step": weights.step, "epoch": weights.epoch}, tmp)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- entry logic

def default_out(source: Path, fmt: str) -> Path:
    name = _DEFAULT_NAMES[fmt]
    if source.is_dir() and (source / EXTRA_STATE).is_file():       # RUN/checkpoints/TAG
        return source.parent.parent / "export" / source.name / name
    if source.is_dir() and ((source / "checkpoints").is_dir() or (source / "export").is_dir()):   # a run folder
        return source / "export" / name
    raise ValueError(f"{source} is not a run or checkpoint folder: give --out")


def export_weights(source: str | Path, fmt: str, out: str | Path | None = None,
                   config: str | Path | dict | None = None) -> Path:
    """Read `source` and write it in `fmt`; returns what was written."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    source = Path(source)
    target = Path(out) if out else default_out(source, fmt)
    if target.resolve() == source.resolve():
        raise ValueError(f"--out {target} is the source itself")
    weights = read_weights(source, config)
    if fmt == "albef":
        return write_albef(weights, target)
    if fmt == "safetensors":
        return write_safetensors(weights, target)
    return write_hf_folder(weights, target)
