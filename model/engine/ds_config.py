"""The DeepSpeed JSON config, completed from the run config and checked.

The run config (YAML) is the one source of the recipe: micro batch per rank,
gradient accumulation, optimiser and schedule. The DeepSpeed JSON holds how the
engine runs (ZeRO stage, precision, buckets). Its batch entries may be "auto"
(filled here) or numbers (which must agree). Everything is checked before any
data is read, and a mismatch names the numbers.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path



@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int      # samples per rank per forward
    grad_accum: int       # forwards per optimiser step
    world_size: int
    queue_size: int | None   # None: the model has no feature queue

    @property
    def global_batch(self) -> int:
        """Samples per optimiser step over all ranks."""
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def enqueue_batch(self) -> int:
        """Columns every forward writes into the queues (all ranks' momentum features)."""
        return self.micro_batch * self.world_size


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--deepspeed_config: no such file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--deepspeed_config {path}: not valid JSON ({err})") from err


def resolve_ds_config(ds_cfg: dict, plan: BatchPlan, source: str = "deepspeed config") -> dict:
    """Return `ds_cfg` with "auto" batch entries filled; refuse anything inconsistent."""
    _positive_int(plan.micro_batch, "train.batch_size_per_rank")
    _positive_int(plan.grad_accum, "train.gradient_accumulation_steps")
    _positive_int(plan.world_size, "world size")
    out = copy.deepcopy(ds_cfg)
    for section in ("optimizer", "scheduler"):
        if section in out:
            raise ValueError(
                f"{source} has an '{section}' section: the optimiser and learning-rate schedule come "
                f"from the run config's `train:` section (paper recipe); remove '{section}' from the JSON")
    for section in ("bf16", "fp16"):
        if out.get(section, {}).get("enabled", False):
            raise ValueError(
                f"{source} enables '{section}': DeepSpeed would cast the momentum model and the queues "
                f"to {section} and the EMA would stop moving (docs/METHOD.md §3). Use "
                f'"torch_autocast": {{"enabled": true, "dtype": "bfloat16"}} instead')
    check_communication_dtype(out, source)
    zero = out.get("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3 and zero.get("stage3_param_persistence_threshold", None) != 0:
        raise ValueError(
            f"{source}: ZeRO-3 needs \"stage3_param_persistence_threshold\": 0 (got "
            f"{zero.get('stage3_param_persistence_threshold', 'the default 1e5')}): a persistent parameter keeps "
            f"a full copy beside its partition that forward passes use and that DeepSpeed refreshes only after "
            f"the optimiser step, so the momentum model would run with the EMA step of the current forward "
            f"missing from its small parameters (checked with deepspeed 0.19.8)")
    wanted = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
    }
    for key, value in wanted.items():
        given = out.get(key, "auto")
        if given == "auto":
            out[key] = value
        elif given != value:
            raise ValueError(
                f"{source}: {key}={given} but the run config gives {value} "
                f"(batch_size_per_rank {plan.micro_batch} x gradient_accumulation_steps {plan.grad_accum} "
                f"x {plan.world_size} ranks = global batch {plan.global_batch}); set it to \"auto\" or {value}")
    if plan.queue_size is not None and plan.queue_size % plan.enqueue_batch:
        raise ValueError(
            f"model.queue_size {plan.queue_size} is not divisible by the per-step enqueue batch "
            f"{plan.enqueue_batch} (batch_size_per_rank {plan.micro_batch} x {plan.world_size} ranks): "
            f"the queue pointer would not wrap cleanly; change the queue size, the batch or the ranks")
    return out


COMMUNICATION_DTYPES = ("fp32", "fp16", "bf16")   # DeepSpeed 0.19.8's `communication_data_type` values


def check_communication_dtype(ds_cfg: dict, source: str) -> None:
    """The gradient-communication dtype keys: valid values, and no key that DeepSpeed would ignore.

    `communication_data_type` (DeepSpeed's own top-level key: "fp32" | "fp16" | "bf16") sets the dtype
    of gradient reductions, but in torch_autocast mode DeepSpeed 0.19.8's ZeRO-1/2/3 optimisers ignore
    it: each parameter's gradient is reduced in the autocast dtype when its module is listed in
    `torch_autocast.lower_precision_safe_modules` (default: torch.nn.Linear and Conv1d/2d/3d, i.e. almost
    all of ALBEF's weights) and in fp32 otherwise (embeddings, LayerNorms, `temp`). There the knob is
    `lower_precision_safe_modules` ([] = every reduction in fp32). Raises ValueError (one line).
    """
    if "communication_data_type" in ds_cfg:
        value = ds_cfg["communication_data_type"]
        if not isinstance(value, str) or value.lower() not in COMMUNICATION_DTYPES:
            raise ValueError(f"{source}: communication_data_type={value!r} is not one of "
                             f"{', '.join(COMMUNICATION_DTYPES)}")
        if autocast_dtype(ds_cfg) is not None and zero_stage(ds_cfg) >= 1:
            raise ValueError(
                f"{source}: communication_data_type is ignored by DeepSpeed's ZeRO-{zero_stage(ds_cfg)} in "
                f"torch_autocast mode (gradients of the modules in torch_autocast.lower_precision_safe_modules, "
                f"default Linear/Conv, are reduced in {autocast_dtype(ds_cfg)}, the rest in fp32); remove it, or "
                f"set \"torch_autocast\": {{\"lower_precision_safe_modules\": []}} to reduce everything in fp32")
    modules = ds_cfg.get("torch_autocast", {}).get("lower_precision_safe_modules")
    if modules is not None and not (isinstance(modules, list) and all(isinstance(m, str) and "." in m
                                                                      for m in modules)):
        raise ValueError(f"{source}: torch_autocast.lower_precision_safe_modules must be a list of class paths "
                         f"such as \"torch.nn.Linear\", got {modules!r}")


# Top-level key of our DeepSpeed JSONs (ignored by DeepSpeed): true in the GPU configs (ds_configs/zero{1,2,3}.json),
# absent in the `*_cpu*.json` ones. Contents cannot tell them apart (the CPU bf16 configs enable the same
# torch_autocast), and without it a launch on a node whose CUDA is broken would train on CPU ranks unnoticed.
REQUIRES_CUDA = "albef_requires_cuda"


def require_cuda(ds_cfg: dict, source: str, cuda_available: bool) -> None:
    """Refuse a GPU DeepSpeed config where torch sees no CUDA device (one line, before any process group)."""
    if ds_cfg.get(REQUIRES_CUDA, False) and not cuda_available:
        raise ValueError(f"{source} is a GPU config (\"{REQUIRES_CUDA}\": true) but torch sees no CUDA device "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): fix the GPU "
                         f"setup, or train on CPU ranks with a CPU config such as ds_configs/zero2_cpu.json")


def zero_stage(ds_cfg: dict) -> int:
    return int(ds_cfg.get("zero_optimization", {}).get("stage", 0))


def autocast_dtype(ds_cfg: dict) -> str | None:
    """'bfloat16' / 'float16' when torch_autocast is on, else None (fp32)."""
    section = ds_cfg.get("torch_autocast", {})
    return section.get("dtype", "bfloat16") if section.get("enabled", False) else None
