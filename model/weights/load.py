"""`load_albef(path)`: a trained ALBEF ready for feature extraction, from whatever the project wrote.

    from model import load_albef
    albef = load_albef("runs/albef_4m")                  # or a checkpoint, .pth, .safetensors, HF-style folder
    model, transform, tokenizer = albef                  # open_clip / LAVIS style unpacking
    with torch.no_grad():
        img_tokens, img_feat = model.encode_image(albef.images([Image.open("cat.jpg")]))   # [1,N,D], [1,E]
        ids, mask = albef.texts(["a cat on a sofa"])
        txt_tokens, txt_feat = model.encode_text(ids, mask)
        match = model.itm_logits(img_tokens, txt_tokens, mask).softmax(-1)[:, 1]

`path` may be:
- a training run folder: its `export/albef.pth` when present, else its newest complete checkpoint;
- a DeepSpeed checkpoint folder of our trainer (`checkpoints/stepNNN/`), any ZeRO stage
  (ZeRO-3 partitions are consolidated on the CPU: `model.weights.deepspeed_files`);
- an exported `.pth` in the released ALBEF layout (`{"model", "config", ...}`);
- a `.safetensors` export (model config in its metadata) or an HF-style folder
  (`config.json` + `model.safetensors` + tokenizer files), see `model.weights.export_formats`.
A released reference checkpoint (`ALBEF_4M.pth`) carries no config of this
project: pass `config=` (a YAML such as configs/pretrain_base.yaml, or its dict).

Everything is read weights-only (`model.engine.safe_load`) or with safetensors, and
goes through `model.weights.released.load_albef_state_dict` (unexplained
missing or unexpected keys raise).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from model.albef import ALBEF, text_settings_from_tokenizer
from model.engine.checkpointing import EXTRA_STATE, newest_complete
from model.engine.config import expand_tree, load_config
from model.engine.export import EXPORT_NAME
from model.engine.safe_load import safe_load
from model.weights.deepspeed_files import engine_module_state, is_engine_checkpoint, load_engine_file
from model.weights.released import LoadReport, export_albef_state_dict, load_albef_state_dict

SAFETENSORS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"
META_CONFIG, META_TIED = "albef_config", "albef_tied"   # safetensors metadata: model section, {alias: key}
ALBEF_TASKS = ("pretrain", "retrieval")   # the tasks whose network is `model.albef.ALBEF`


@dataclass
class ALBEFWeights:
    """Weights in the released layout plus what is needed to rebuild the network."""
    state: dict[str, torch.Tensor]        # released-layout state dict (momentum copies and queues included)
    config: dict                          # a run config with a `model` section (`${VAR}` unexpanded)
    source: str                           # the file or folder the tensors came from
    step: int | None = None
    epoch: int | None = None

    @property
    def model_config(self) -> dict:
        """The `model` section, `${VAR}` expanded, without `init` weights (the tensors here replace them)."""
        cfg = expand_tree(copy.deepcopy(self.config["model"]))
        cfg["vision"]["init"] = None
        cfg["text"]["init"] = None
        return cfg


def _config_arg(config: str | Path | dict | None) -> dict | None:
    """`config=`: a YAML path or a dict, either a whole run config or only its model section."""
    if config is None:
        return None
    cfg = load_config(config) if isinstance(config, (str, Path)) else copy.deepcopy(config)
    return cfg if "model" in cfg else {"model": cfg}


def _checked_config(config: Any, given: dict | None, source: str) -> dict:
    if given is not None:
        return given
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{source} carries no model config of this project (a released reference checkpoint?): "
                         f"pass config= (e.g. configs/pretrain_base.yaml)")
    task = config.get("task", "pretrain")
    if task not in ALBEF_TASKS:
        raise ValueError(f"{source} is a `task: {task}` model; load_albef and the exports handle the ALBEF "
                         f"network of tasks {', '.join(ALBEF_TASKS)}")
    return config


def _read_pth(path: Path, given: dict | None) -> ALBEFWeights:
    state = safe_load(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, expected {{'model': state_dict, ...}}")
    sd = state["model"] if isinstance(state.get("model"), dict) else state
    config = _checked_config(state.get("config"), given, str(path))
    return ALBEFWeights(sd, config, str(path), state.get("step"), state.get("epoch"))


def _read_engine_checkpoint(tag_dir: Path, given: dict | None) -> ALBEFWeights:
    """A DeepSpeed checkpoint of our trainer (any ZeRO stage) -> released layout, via the module it came from."""
    if not (tag_dir / EXTRA_STATE).is_file():
        raise FileNotFoundError(f"{tag_dir}: no {EXTRA_STATE} (not a complete checkpoint of this project's trainer)")
    extra = load_engine_file(tag_dir, tag_dir / EXTRA_STATE)
    config = _checked_config(extra.get("config"), given, str(tag_dir))
    weights = ALBEFWeights({}, config, str(tag_dir), extra.get("step"), extra.get("epoch"))
    model = ALBEF(weights.model_config)
    module_state = engine_module_state(tag_dir)
    ours = model.state_dict()
    for name, value in module_state.items():  # 0-d parameters have shape [1] inside the engine
        if name in ours and ours[name].dim() == 0 and value.shape == (1,):
            module_state[name] = value.reshape(())
    try:
        missing, unexpected = model.load_state_dict(module_state, strict=False)
    except RuntimeError as err:   # shape mismatches
        raise ValueError(f"{tag_dir}: the checkpoint does not fit its own config: {str(err).splitlines()[-1]}") \
            from None
    if missing or unexpected:
        raise ValueError(f"{tag_dir}: the checkpoint does not fit its own config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    weights.state = {k: v.detach() for k, v in export_albef_state_dict(model).items()}
    return weights


def read_safetensors(path: Path, given: dict | None = None) -> ALBEFWeights:
    """A `.safetensors` export: its tensors (tied aliases restored as the same tensor) and model config."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if given is None and META_CONFIG not in metadata:
        raise ValueError(f"{path}: no {META_CONFIG} in its metadata (not exported by this project): pass config=")
    state = load_file(str(path))
    for alias, stored in json.loads(metadata.get(META_TIED, "{}")).items():
        state[alias] = state[stored]
    config = given or {"model": json.loads(metadata[META_CONFIG])}
    return ALBEFWeights(state, config, str(path), json.loads(metadata.get("step", "null")),
                        json.loads(metadata.get("epoch", "null")))


def read_hf_folder(folder: Path, given: dict | None = None) -> ALBEFWeights:
    """config.json (the model section) + model.safetensors; `text.tokenizer: "."` names the folder itself."""
    config = given or {"model": json.loads((folder / HF_CONFIG_NAME).read_text())}
    weights = read_safetensors(folder / SAFETENSORS_NAME, config)
    text = weights.config["model"]["text"]
    if text.get("tokenizer") in (".", "./"):
        text["tokenizer"] = str(folder.resolve())
    weights.source = str(folder)
    return weights


def read_weights(path: str | Path, config: str | Path | dict | None = None) -> ALBEFWeights:
    """The weights at `path` (see the module docstring for what it may be), in the released layout."""
    given = _config_arg(config)
    path = Path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return read_safetensors(path, given)
        return _read_pth(path, given)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if (path / HF_CONFIG_NAME).is_file() and (path / SAFETENSORS_NAME).is_file():
        return read_hf_folder(path, given)
    if (path / EXTRA_STATE).is_file() or is_engine_checkpoint(path):
        return _read_engine_checkpoint(path, given)
    export = path / "export" / EXPORT_NAME
    if export.is_file():
        return _read_pth(export, given)
    for ckpt_dir in (path / "checkpoints", path):
        tag = newest_complete(ckpt_dir)
        if tag is not None:
            return _read_engine_checkpoint(tag, given)
    raise FileNotFoundError(f"{path}: not a run folder (no export/{EXPORT_NAME}, no complete checkpoint), "
                            f"checkpoint folder or HF-style folder ({HF_CONFIG_NAME} + {SAFETENSORS_NAME})")


@dataclass
class LoadedALBEF:
    """A model in eval mode with its image transform and tokenizer; unpacks as (model, transform, tokenizer)."""
    model: ALBEF
    transform: Any                # pipeline.transforms.ImageTransform(res, train=False): PIL RGB -> [3,H,W]
    tokenizer: Any                # transformers.BertTokenizerFast of the run
    config: dict                  # the model section the network was built from
    report: LoadReport
    step: int | None = None
    epoch: int | None = None
    max_tokens: int = field(default=30)   # caption truncation of the reference's retrieval evaluation

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.transform, self.tokenizer))

    @property
    def device(self) -> torch.device:
        return self.model.temp.device

    def images(self, images: Sequence) -> torch.Tensor:
        """PIL images -> normalised batch [B,3,H,W] on the model's device (the evaluation transform)."""
        return torch.stack([self.transform(img.convert("RGB")) for img in images]).to(self.device)

    def texts(self, captions: Sequence[str], max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (input_ids, attention_mask) [B,L] on the model's device, cleaned and tokenised as in
        training and evaluation (`pre_caption`, `[CLS] tokens` without `[SEP]`)."""
        from pipeline.captions import pre_caption
        from pipeline.tokenize import text_batch
        limit = max_tokens or self.max_tokens
        ids, mask = text_batch(self.tokenizer, [pre_caption(c, limit) for c in captions], limit)
        return ids.to(self.device), mask.to(self.device)


def load_albef(path: str | Path, device: str | torch.device = "cpu",
               config: str | Path | dict | None = None) -> LoadedALBEF:
    """A trained ALBEF from a run folder, checkpoint folder (ZeRO-0..3), `.pth`, `.safetensors` or HF-style
    folder: the model in eval mode on `device`, its test image transform and its tokenizer."""
    from pipeline.tokenize import load_tokenizer
    from pipeline.transforms import ImageTransform

    weights = read_weights(path, config)
    cfg = weights.model_config
    tokenizer = load_tokenizer(cfg["text"]["tokenizer"])
    cfg["text"].update(text_settings_from_tokenizer(tokenizer))
    model = ALBEF(cfg)
    report = load_albef_state_dict(model, weights.state)
    report.source = weights.source
    model.to(device).eval()
    return LoadedALBEF(model, ImageTransform(cfg["vision"]["image_res"], train=False), tokenizer, cfg, report,
                       weights.step, weights.epoch)
