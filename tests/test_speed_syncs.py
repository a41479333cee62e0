"""Device-to-host syncs in the training loop's non-logging steps: only the documented ones.

`benchmarks/syncs.py` runs the real `Trainer` (world size 1, gloo, ZeRO-2 CPU
config, `train.debug_records=false`) in one process and, after 3 warm-up steps,
counts every call of `Tensor.item`, `tolist`, `__float__`, `__int__`, `__bool__`,
`__index__`, `numpy`, `cpu`, `nonzero`, `masked_select`, `unique` and boolean-mask
indexing during 4 optimiser steps, by call site. Allowed (docs/SPEED.md, and
`ALLOWED` in benchmarks/syncs.py):
- device reads: MLM's one `nonzero` per micro-step (model/albef.py `mlm`), and
  DeepSpeed ZeRO-1/2's inf/NaN check of the gradient norm once per optimiser step
  (`is_invalid_grad_norm`; gone with `zero_optimization.compute_grad_norm: false`);
- host reads (CPU tensors, no sync on a GPU either): torch AdamW's CPU step counter
  (for-each AdamW of CPU ranks; CUDA runs use fused AdamW) and the shard loader's
  position tensors.
Anything else fails the test with its call site.
"""
import copy
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.albef import ALBEF
from model.engine.config import load_config
from model.losses import IGNORE_INDEX, mlm_loss, total_loss

REPO = Path(__file__).resolve().parents[1]
WARMUP, STEPS = 3, 4


def _old_mlm(self, masked_ids, labels, attention_mask, image_tokens, image_tokens_m, alpha):
    """ALBEF.mlm before: three boolean-mask indexings (three syncs on a GPU)."""
    chosen = labels != IGNORE_INDEX
    states = self.text_encoder.fuse(self.text_encoder.encode(masked_ids, attention_mask), attention_mask, image_tokens)
    logits = self.text_encoder.mlm_head(states[chosen])
    with torch.no_grad():
        states_m = self.text_encoder_m.fuse(self.text_encoder_m.encode(masked_ids, attention_mask),
                                            attention_mask, image_tokens_m)
        soft_labels = F.softmax(self.text_encoder_m.mlm_head(states_m[chosen]).float(), dim=-1)
    return mlm_loss(logits, labels[chosen], soft_labels, alpha)


def test_mlm_gather_equals_boolean_mask_indexing_exactly():
    cfg = load_config(REPO / "configs" / "tiny.yaml")["model"]
    torch.manual_seed(0)
    model = ALBEF(cfg).train()
    reference = copy.deepcopy(model)
    reference.mlm = types.MethodType(_old_mlm, reference)
    g = torch.Generator().manual_seed(2)
    image = torch.randn(6, 3, 32, 32, generator=g)
    ids = torch.randint(5, 388, (6, 12), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    results = []
    for m in (model, reference):
        torch.manual_seed(5)
        out = m(image, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(9))
        total_loss(out).backward()
        results.append((out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (out, grads), (ref_out, ref_grads) = results
    for key in ref_out:
        assert torch.equal(out[key], ref_out[key]), key
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def _count(*extra: str) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "syncs.py"), "--warmup", str(WARMUP),
                           "--steps", str(STEPS), *extra, "data.num_workers=1"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"benchmarks/syncs.py printed no result ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])


def _device_sites(result: dict) -> dict[str, int]:
    sites: dict[str, int] = {}
    for call in result["calls"]:
        if call["reads"] == "device":
            key = f"{call['file']}:{call['function']}:{call['kind']}"
            sites[key] = sites.get(key, 0) + call["calls"]
    return sites


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_training_loop_syncs_are_only_the_documented_ones():
    # with the GPU recipe's device augmentation: the real trainer consumes crops + plans, reading no device tensor
    result = _count("data.augment.on_device=true")
    unexplained = [c for c in result["calls"] if c["reads"] == "unexplained"]
    assert not unexplained, f"host reads outside benchmarks/syncs.py ALLOWED: {unexplained}"
    assert result["micro_steps_per_step"] == 1
    # exactly: MLM's nonzero once per micro-step, DeepSpeed's grad-norm check once per optimiser step
    assert _device_sites(result) == {"model/albef.py:mlm:nonzero": STEPS,
                                     "deepspeed/runtime/utils.py:is_invalid_grad_norm:__bool__": STEPS}
    assert not [c for c in result["calls"] if c["kind"] == "bool_mask_index"]
    assert {c["reads"] for c in result["calls"] if c["file"] == "pipeline/device_augment.py"} == {"host"}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_without_deepspeed_grad_norm_only_the_mlm_sync_remains():
    result = _count("--ds-set", "zero_optimization.compute_grad_norm=false")
    assert result["calls_per_step"]["unexplained"] == 0, result["calls"]
    assert _device_sites(result) == {"model/albef.py:mlm:nonzero": STEPS}
