"""Our trainer's DeepSpeed checkpoints (any ZeRO stage) read back on the CPU, without a process group.

Every file is read weights-only (`model.engine.safe_load`: tensors, plain data and
exactly the classes DeepSpeed 0.19.8 pickles into them), after its checksum
(`checksums.json`, `model.engine.checkpointing.verify_files`) where the checkpoint has one.

Layout written by deepspeed 0.19.8 in `checkpoints/<tag>/`:
- ZeRO-0/1/2: `mp_rank_00_model_states.pt` holds the whole module (`module`),
  kept current by the engine after every step (fp32: torch_autocast mode).
- ZeRO-3: per rank R, `zero_pp_rank_R_mp_rank_00_model_states.pt` with the
  buffers in full (`module`, `buffer_names`), the trained parameters' names and
  shapes in flattening order (`param_shapes`), the frozen parameters' shapes
  and this rank's partitions of them (`frozen_param_shapes`,
  `frozen_param_fragments`: our momentum copies), and on rank 0 the tied
  aliases (`shared_params`: alias -> stored name); and
  `zero_pp_rank_R_mp_rank_00_optim_states.pt` with this rank's fp32 partition
  of every trained parameter (`optimizer_state_dict.fp32_flat_groups`).
  A parameter of n elements owns ceil(n / world) elements of every rank's flat
  partition (padded at the end); the parameters follow each other in
  `param_shapes` order. Frozen parameters are partitioned the same way, one
  tensor each.

`deepspeed.utils.zero_to_fp32` does the same consolidation but unpickles
everything (`weights_only=False`); this module avoids that.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from model.engine.checkpointing import verify_files
from model.engine.safe_load import deepspeed_globals, safe_load

ZERO012_MODULE_FILE = "mp_rank_00_model_states.pt"
_ZERO3_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_(model|optim)_states\.pt$")


def load_engine_file(tag_dir: Path, path: Path):
    """One file of a DeepSpeed checkpoint: checksum first (when recorded), then a weights-only load."""
    status, problem = verify_files(tag_dir, [path.relative_to(tag_dir).as_posix()])
    if status == "damaged":
        raise ValueError(f"{tag_dir}: damaged checkpoint ({problem})")
    return safe_load(path, deepspeed_globals())


def is_engine_checkpoint(tag_dir: Path) -> bool:
    return (tag_dir / ZERO012_MODULE_FILE).is_file() or bool(_zero3_files(tag_dir, "model"))


def engine_module_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The engine module's full state dict (our parameter names, buffers included) from any ZeRO stage.

    Shapes are as inside the engine: 0-d parameters come back with shape [1]
    (`model.engine.trainer.vectorise_scalar_params`); the caller restores them.
    """
    if _zero3_files(tag_dir, "model"):
        return _zero3_module_state(tag_dir)
    module_file = tag_dir / ZERO012_MODULE_FILE
    if not module_file.is_file():
        raise FileNotFoundError(f"{tag_dir}: neither {ZERO012_MODULE_FILE} nor ZeRO-3 partition files "
                                f"(not a DeepSpeed checkpoint)")
    return dict(load_engine_file(tag_dir, module_file)["module"])


def _zero3_files(tag_dir: Path, kind: str) -> list[Path]:
    """Rank-ordered `zero_pp_rank_R_mp_rank_00_{kind}_states.pt` files; ranks must be 0..N-1."""
    found = {}
    for path in tag_dir.glob(f"*zero_pp_rank_*_mp_rank_00_{kind}_states.pt"):
        match = _ZERO3_FILE.match(path.name)
        if match:
            found[int(match.group(1))] = path
    if found and sorted(found) != list(range(len(found))):
        raise ValueError(f"{tag_dir}: {kind} state files for ranks {sorted(found)}: some ranks are missing")
    return [found[r] for r in sorted(found)]


def _zero3_module_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    model_states = [load_engine_file(tag_dir, p) for p in _zero3_files(tag_dir, "model")]
    optim_files = _zero3_files(tag_dir, "optim")
    world = len(model_states)
    if len(optim_files) != world:
        raise ValueError(f"{tag_dir}: {world} model state files but {len(optim_files)} optimizer state files")
    first = model_states[0]
    if first.get("param_shapes") is None:
        raise ValueError(f"{tag_dir}: the partition files have no param_shapes (not a ZeRO-3 checkpoint)")
    # fp32 partitions of the trained parameters: one flat vector per rank ([ceil(n/world) per parameter])
    flats = []
    for path in optim_files:
        optim = load_engine_file(tag_dir, path)["optimizer_state_dict"]
        if optim.get("zero_stage") != 3 or optim.get("partition_count") != world:
            raise ValueError(f"{path}: zero_stage {optim.get('zero_stage')}, partition_count "
                             f"{optim.get('partition_count')}; expected ZeRO-3 over {world} ranks")
        flats.append(torch.cat([g.reshape(-1) for g in optim["fp32_flat_groups"]]))

    state: dict[str, torch.Tensor] = {}
    names = set(first["buffer_names"])
    state.update({k: v.clone() for k, v in first["module"].items() if k in names})

    offset = 0
    for group in first["param_shapes"]:
        for name, shape in group.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            pieces = [flat[offset:offset + part] for flat in flats]
            state[name] = torch.cat(pieces)[:numel].view(shape).clone()
            offset += part
    if offset != flats[0].numel():
        raise ValueError(f"{tag_dir}: the trained parameters take {offset} elements per rank, "
                         f"the optimizer partitions hold {flats[0].numel()}")

    for name, shape in (first.get("frozen_param_shapes") or {}).items():  # the momentum copies
        numel = math.prod(shape)
        pieces = [ms["frozen_param_fragments"][name].reshape(-1) for ms in model_states]
        state[name] = torch.cat(pieces)[:numel].view(shape).clone()

    for alias, stored in (first.get("shared_params") or {}).items():   # tied weights (MLM decoder)
        state[alias] = state[stored]
    return state
