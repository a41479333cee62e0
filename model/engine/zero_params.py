"""Editing a trained parameter in place under every ZeRO stage (the optimiser's fp32 master copy too)."""
from __future__ import annotations

import torch
from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param


@torch.no_grad()
def clamp_parameter(param: torch.nn.Parameter, low: float, high: float) -> None:
    """Keep a parameter (ALBEF's `temp`) and the optimiser's fp32 master copy of it inside [low, high].

    The reference clamps `temp` in place at every forward, so the clamped value is
    what the next update starts from. Under ZeRO-1/2/3 the optimiser updates its
    own fp32 master copy and writes it back after each step; the forward's clamp
    never reaches that copy (under ZeRO-3 it only touches a gathered, discarded
    copy), which could drift past the bound. Called after every optimiser step,
    on every rank. Every clamp here is unconditional and in place on this rank's
    own tensors: no collective and no device-to-host read (the training loop's
    non-logging steps stay free of syncs, tests/test_speed_syncs.py). Under ZeRO-1/2
    the rank that owns the parameter's slice of the flat fp32 master clamps that
    slice (DeepSpeed's `_hp_mapping`, None on the other ranks; `safe_get_full_fp32_param`
    would all-reduce it every step); the module parameter, replicated on every rank,
    is clamped by each. (DeepSpeed 0.19.8's full-parameter setter fails for a ZeRO-3
    parameter smaller than the world size, hence the local partition API there.)
    """
    if hasattr(param, "ds_id"):  # ZeRO-3: each rank clamps its partition (padding included, unused)
        safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp(low, high))
        param.ds_tensor.clamp_(low, high)
        return
    if not hasattr(param, "_hp_mapping"):  # no ZeRO optimiser: the forward's clamp persists
        return
    if param._hp_mapping is not None:      # this rank holds (a slice of) the fp32 master
        param._hp_mapping.get_hp_fragment().clamp_(low, high)
    param.clamp_(low, high)
