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
  A ZeRO-3 checkpoint holds only partitions: export it first. An ALBEF module
  (pretraining, retrieval, grounding) comes out in the released layout; another
  task's model (VE, NLVR2, VQA, text assignment) comes out as its own state,
  marked with the task, for that task's loader (`load_engine_state`).

Every file is read weights-only (`model/engine/safe_load.py`): a file holding
anything but tensors and plain data (a pickle that could run code) is refused
with one line naming it. The files of a DeepSpeed checkpoint are checked against
its `checksums.json` first; a run folder's newest intact checkpoint is used.

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
from model.weights.released import (CheckpointMismatchError, LoadReport, export_albef_state_dict,
                                    load_albef_state_dict)
from model.engine.checkpointing import EXTRA_STATE, complete_tags, newest_complete, verify_files
from model.engine.export import EXPORT_NAME
from model.engine.safe_load import UnreadableCheckpointError, UnsafeCheckpointError, deepspeed_globals, safe_load

ZERO012_MODULE_FILE = "mp_rank_00_model_states.pt"
ENGINE_TASK = "engine_task"   # marks `read_checkpoint`'s output holding a non-ALBEF task model's own state
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
        state = safe_load(path)
    except UnsafeCheckpointError as err:
        raise ValueError(f"--checkpoint {err}") from None
    except UnreadableCheckpointError as err:
        raise ValueError(f"--checkpoint {path}: cannot be read as a PyTorch checkpoint "
                         f"({str(err).split(' (', 1)[-1]}") from None
    if not isinstance(state, dict):
        raise ValueError(f"--checkpoint {path}: holds a {type(state).__name__}, expected a state dict "
                         f"or {{'model': state_dict}}")
    return state


def _checked(tag_dir: Path) -> str | None:
    """Why the files `_deepspeed_state` reads from `tag_dir` fail their checksums, or None."""
    status, problem = verify_files(tag_dir, [ZERO012_MODULE_FILE, EXTRA_STATE])
    return problem if status == "damaged" else None


def _deepspeed_state(tag_dir: Path) -> dict:
    """Released-layout state dict of one of our trainer's ZeRO-0/1/2 DeepSpeed checkpoints."""
    module_file = tag_dir / ZERO012_MODULE_FILE
    if not module_file.is_file():
        if (tag_dir / ZERO3_MODULE_FILE).is_file():
            raise ValueError(f"--checkpoint {tag_dir}: a ZeRO-3 checkpoint holds only parameter partitions; "
                             f"use the run's export/{EXPORT_NAME} (written at the end of training)")
        raise FileNotFoundError(f"--checkpoint {tag_dir}: no {ZERO012_MODULE_FILE} (not a DeepSpeed checkpoint)")
    problem = _checked(tag_dir)
    if problem:
        raise ValueError(f"--checkpoint {tag_dir}: damaged checkpoint ({problem})")
    try:   # weights-only, with exactly the classes DeepSpeed 0.19.8 writes
        engine_state = safe_load(module_file, deepspeed_globals())
        extra = safe_load(tag_dir / EXTRA_STATE)
    except (UnsafeCheckpointError, UnreadableCheckpointError) as err:
        raise ValueError(f"--checkpoint {err}") from None
    src_cfg = copy.deepcopy(extra["config"]["model"])
    src_cfg["vision"]["init"] = None
    src_cfg["text"]["init"] = None
    source = ALBEF(src_cfg)
    module_state = dict(engine_state["module"])
    if set(module_state) != set(source.state_dict()):
        # another task's model (VE/NLVR2 classifier, VQA, text assignment): its own loader takes the
        # engine's state as it is (`load_engine_state`)
        return {"model": module_state, ENGINE_TASK: extra.get("task", "unknown")}
    for name, p in source.named_parameters():
        if p.dim() == 0 and name in module_state:  # the trainer gives 0-d parameters shape [1] for DeepSpeed
            module_state[name] = module_state[name].reshape(())
    source.load_state_dict(module_state, strict=True)
    return {"model": export_albef_state_dict(source)}


def load_engine_state(model: torch.nn.Module, state: dict, source: str, task: str) -> LoadReport | None:
    """Load our trainer's DeepSpeed module state of a task model into `model` (the same class), or
    return None when `state` is not such a state. Anything that does not fit is refused, naming the
    task that wrote it."""
    if ENGINE_TASK not in state:
        return None
    saved, ours = state["model"], model.state_dict()
    for name, value in ours.items():
        if name in saved and value.dim() == 0 and saved[name].shape == (1,):   # [1] inside DeepSpeed
            saved[name] = saved[name].reshape(())
    missing, unexpected = sorted(set(ours) - set(saved)), sorted(set(saved) - set(ours))
    shapes = [k for k in ours if k in saved and saved[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(
            f"{source}: a DeepSpeed checkpoint of a {state[ENGINE_TASK]!r} run does not fit this {task} model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, shapes differ {shapes[:3]}); "
            f"give that run's export/{EXPORT_NAME} if it has one")
    model.load_state_dict(saved, strict=True)
    report = LoadReport(f"{source} (DeepSpeed checkpoint of a {state[ENGINE_TASK]} run)")
    report.loaded = list(ours)
    return report


def _newest_intact(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files pass their checksums (the one `latest` names first)."""
    newest = newest_complete(ckpt_dir)
    if newest is None:
        return None
    tags = [newest.name] + [t for t in reversed(complete_tags(ckpt_dir)) if t != newest.name]
    for tag in tags:
        problem = _checked(ckpt_dir / tag)
        if problem is None:
            return ckpt_dir / tag
        print(f"[checkpoint] warning: {ckpt_dir / tag} is damaged ({problem}); trying the previous one", flush=True)
    return newest   # all damaged: _deepspeed_state names the problem


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
    tag = path if (path / EXTRA_STATE).is_file() else _newest_intact(path / "checkpoints")
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
