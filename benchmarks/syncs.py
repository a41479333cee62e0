"""Device-to-host reads in the real training loop's non-logging steps, counted call by call.

    python benchmarks/syncs.py [--config configs/tiny.yaml] [--deepspeed-config ds_configs/zero2_cpu.json]
                               [--warmup 3] [--steps 4] [--shards SPEC] [k=v ...]

Runs `model.engine.trainer.Trainer` in this one process (world size 1, gloo on
the CPU, NCCL on a GPU) with `train.debug_records=false` and no logging,
checkpoint or evaluation step inside the counted window. After `--warmup`
optimiser steps it replaces, on `torch.Tensor`, every method that reads a
tensor's value on the host (`item`, `tolist`, `__float__`, `__int__`,
`__bool__`, `__index__`, `numpy`, `cpu`) and the data-dependent-size operations
that must read the device to know their output size (`nonzero`, `masked_select`,
`unique`, boolean-mask indexing `x[mask]`) with counting wrappers, runs
`--steps` optimiser steps, and prints one JSON object: the calls by kind and by
call site (the innermost frame in this repository or DeepSpeed), and which of
them `ALLOWED` does not explain. On CUDA it also turns on
`torch.cuda.set_sync_debug_mode("warn")` for the window and counts the
synchronising operations torch itself reports (e.g. inside C++ ops), by the
Python line that called them.

Without `--shards`, shards of generated images are written to a temporary folder
(tests/fixtures/shards.py). Exit status 1 when a call outside `ALLOWED` was seen.
tests/test_speed_syncs.py runs it on the CPU; docs/SPEED.md lists the allowed calls.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (file, function) of the innermost frame in this repository or DeepSpeed -> (what it reads, why it is
# accepted in the hot loop). docs/SPEED.md lists the same. "device": a real device-to-host sync on a GPU;
# "host": a CPU tensor (no sync on a GPU either).
ALLOWED = {
    ("model/albef.py", "mlm"): (
        "device", "one `nonzero` per micro-step: MLM scores only the ~15% masked positions and their number "
        "is data dependent; the positions are listed once and gathered (index_select) for the online "
        "states, the momentum states and the labels. A fixed-size alternative would run the 30522-way head "
        "on all B*L positions (+~2% FLOPs, ~1 GB at batch 64) and change the loss's summation order"),
    ("deepspeed/runtime/utils.py", "is_invalid_grad_norm"): (
        "device", "one per optimiser step, inside DeepSpeed ZeRO-1/2's step: `bool()` of the global gradient "
        "norm's finiteness, to skip a step with inf/NaN gradients (params are fp32 in torch_autocast mode). "
        "`zero_optimization.compute_grad_norm: false` in the DeepSpeed JSON removes it (ZeRO-1/2, needs "
        "gradient_clipping 0; a non-finite gradient is then applied, not skipped)"),
    ("deepspeed/runtime/zero/stage_1_and_2.py", "_optimizer_step"): (
        "host", "torch.optim.AdamW (for-each implementation, CPU ranks) reads its step counter, a CPU "
        "tensor; on CUDA the trainer builds fused AdamW, whose step counter stays on the device"),
    ("pipeline/device_augment.py", "augment_on_device"): (
        "host", "data.augment.on_device: the batch's crop shapes and augmentation plans, CPU tensors made by "
        "the loader, become Python lists to group the samples by op; never a device tensor"),
    ("pipeline/loader.py", "<genexpr>"): (
        "host", "the shard loader reads each batch's loader-position tensors, CPU tensors made by the "
        "DataLoader (pinned host memory on a GPU), never on the device"),
}

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")
DYNAMIC_SIZE = ("nonzero", "masked_select", "unique")


def _site(stack: list[traceback.FrameSummary]) -> tuple[str, str, int]:
    """The innermost frame in this repository (not this file) or in DeepSpeed: (file, function, line)."""
    me = Path(__file__).resolve()
    for frame in reversed(stack):
        path = Path(frame.filename).resolve()
        if path == me:
            continue
        if "deepspeed" in path.parts:
            rel = "deepspeed/" + "/".join(path.parts[path.parts.index("deepspeed") + 1:])
            return rel, frame.name, frame.lineno
        if REPO in path.parents and ".venv" not in path.parts:
            return str(path.relative_to(REPO)), frame.name, frame.lineno
    top = stack[-1]
    return top.filename, top.name, top.lineno


class SyncCounter:
    """Counting wrappers on torch.Tensor (installed by `start`, removed by `stop`)."""

    def __init__(self) -> None:
        import torch
        self.torch = torch
        self.calls: collections.Counter = collections.Counter()
        self.saved: dict[str, object] = {}
        self.active = False

    def _record(self, kind: str) -> None:
        if not self.active:
            return
        self.active = False          # no counting of what the bookkeeping itself does
        try:
            stack = traceback.extract_stack()[:-2]
            file, func, line = _site(stack)
            origin = f"{Path(stack[-1].filename).name}:{stack[-1].lineno} {stack[-1].name}"
            self.calls[(kind, file, func, line, origin)] += 1
        finally:
            self.active = True

    def _wrap(self, name: str, kind: str | None = None):
        original = getattr(self.torch.Tensor, name)
        counter = self

        def wrapper(self, *args, **kwargs):
            counter._record(kind or name)
            return original(self, *args, **kwargs)
        self.saved[name] = original
        setattr(self.torch.Tensor, name, wrapper)

    def _wrap_getitem(self) -> None:
        original = self.torch.Tensor.__getitem__
        counter, torch = self, self.torch

        def is_mask(index) -> bool:
            if isinstance(index, torch.Tensor):
                return index.dtype == torch.bool
            if isinstance(index, tuple):
                return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
            return False

        def wrapper(self, index):
            if counter.active and is_mask(index):
                counter._record("bool_mask_index")
            return original(self, index)
        self.saved["__getitem__"] = original
        self.torch.Tensor.__getitem__ = wrapper

    def start(self) -> None:
        for name in HOST_READS + DYNAMIC_SIZE:
            self._wrap(name)
        self._wrap_getitem()
        self.active = True

    def stop(self) -> None:
        self.active = False
        for name, original in self.saved.items():
            setattr(self.torch.Tensor, name, original)
        self.saved.clear()

    def report(self) -> list[dict]:
        return [{"kind": kind, "file": file, "function": func, "line": line, "origin": origin, "calls": n,
                 "allowed": (file, func) in ALLOWED,
                 "reads": ALLOWED[(file, func)][0] if (file, func) in ALLOWED else "unexplained"}
                for (kind, file, func, line, origin), n in sorted(self.calls.items())]


def run(config: str, ds_config: str, warmup: int, steps: int, shards: str | None, overrides: list[str],
        out_dir: Path) -> dict:
    import torch

    from model.cli import parse_train_args
    from model.engine.trainer import Trainer
    from model.tasks import load_run

    total = warmup + steps + 1   # the last step logs, checkpoints and exports: outside the window
    argv = ["--config", config, "--deepspeed_config", ds_config, "--output-dir", str(out_dir),
            "--max-steps", str(total), f"data.shards={shards}", "train.debug_records=false",
            f"train.log_every={10 * total}", f"train.checkpoint_every={10 * total}",
            f"train.stop_check_every={10 * total}", *overrides]
    args = parse_train_args(argv)
    recipe_cls, run_cfg = load_run(args.config, args.overrides)
    trainer = Trainer(args, recipe_cls, run_cfg)
    accum = trainer.plan.grad_accum
    if trainer.batches_per_epoch <= total * accum:
        raise ValueError(f"{trainer.batches_per_epoch} batches per epoch: the window would cross an epoch end; "
                         f"give more shards")
    counter = SyncCounter()
    cuda = trainer.device.type == "cuda"
    caught: dict[str, list] = {"warnings": []}
    catcher = warnings.catch_warnings(record=True)
    original_step = trainer.recipe.step

    def step(module, batch, alpha, generator):
        # micro_step counts the forwards already run: start before step warmup+1's first forward,
        # stop before step warmup+steps+1's (its data fetch is counted, its forward is not)
        if trainer.micro_step == warmup * accum:
            if cuda:
                torch.cuda.synchronize()
                caught["warnings"] = catcher.__enter__()   # the list the warnings go to
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            counter.start()
        elif trainer.micro_step == (warmup + steps) * accum:
            counter.stop()
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
                catcher.__exit__(None, None, None)
        return original_step(module, batch, alpha, generator)

    trainer.recipe.step = step
    try:
        trainer.train()
    finally:
        counter.stop()
    calls = counter.report()
    result = {
        "config": config, "deepspeed_config": ds_config, "device": str(trainer.device),
        "world_size": trainer.world, "zero_stage": trainer.zero_stage, "warmup_steps": warmup,
        "counted_steps": steps, "micro_steps_per_step": accum,
        "calls": calls,
        "calls_per_step": {reads: sum(c["calls"] for c in calls if c["reads"] == reads) / steps
                           for reads in ("device", "host", "unexplained")},
        "allowed": {f"{f}:{fn}": f"{reads}: {why}" for (f, fn), (reads, why) in ALLOWED.items()},
    }
    if cuda:
        sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught["warnings"]
                                    if "synchroniz" in str(w.message))
        result["cuda_sync_warnings"] = dict(sites)
        result["cuda_sync_warnings_per_step"] = sum(sites.values()) / steps
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--deepspeed-config", default=str(REPO / "ds_configs" / "zero2_cpu.json"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--shards", help="shard spec (default: generated, 24 x 10 samples)")
    parser.add_argument("--output-dir", help="run folder (default: a temporary one)")
    parser.add_argument("--ds-set", action="append", default=[], metavar="KEY=JSON",
                        help="change the DeepSpeed JSON, e.g. zero_optimization.compute_grad_norm=false")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = args.shards
        if spec is None:
            from tests.fixtures.shards import brace_spec, write_shards
            write_shards(tmp / "shards", (10,) * 24, seed=5)
            spec = brace_spec(tmp / "shards", 24)
        ds_config = args.deepspeed_config
        if args.ds_set:
            cfg = json.loads(Path(ds_config).read_text())
            for item in args.ds_set:
                key, _, value = item.partition("=")
                *parents, leaf = key.split(".")
                node = cfg
                for name in parents:
                    node = node.setdefault(name, {})
                node[leaf] = json.loads(value)
            ds_config = str(tmp / "ds_config.json")
            Path(ds_config).write_text(json.dumps(cfg))
        result = run(args.config, ds_config, args.warmup, args.steps, spec, args.overrides,
                     Path(args.output_dir) if args.output_dir else tmp / "run")
        result["ds_set"] = args.ds_set
    print(json.dumps(result), flush=True)
    return 1 if result["calls_per_step"]["unexplained"] else 0


if __name__ == "__main__":
    sys.exit(main())
