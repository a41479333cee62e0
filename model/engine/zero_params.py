"""Editing a trained parameter in place under every ZeRO stage (the optimiser's fp32 master copy too)."""
from __future__ import annotations

import torch
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_full_fp32_param,
                             safe_set_local_fp32_param)


@torch.no_grad()
def clamp_parameter(param: torch.nn.Parameter, low: float, high: float) -> None:
    """Keep a parameter (ALBEF's `temp`) and the optimiser's fp32 master copy of it inside [low, high].

    The reference clamps `temp` in place at every forward, so the clamped value is
    what the next update starts from. Under ZeRO-1/2/3 the optimiser updates its
    own fp32 master copy and writes it back after each step; the forward's clamp
    never reaches that copy (under ZeRO-3 it only touches a gathered, discarded
    copy), which could drift past the bound. Called after every optimiser step,
    on every rank (collective under ZeRO-1/2). (DeepSpeed 0.19.8's full-parameter
    setter fails for a ZeRO-3 parameter smaller than the world size, hence the
    local partition API there.) The comparison below reads the device, but only
    for this one-element tensor.
    """
    if hasattr(param, "ds_id"):  # ZeRO-3: each rank clamps its partition (padding included, unused)
        safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp(low, high))
        param.ds_tensor.clamp_(low, high)
        return
    master = safe_get_full_fp32_param(param)  # None without a ZeRO optimiser: the forward's clamp persists
    if master is None:
        return
    clamped = master.clamp(low, high)
    if not torch.equal(clamped, master):
        safe_set_full_fp32_param(param, clamped)
        param.clamp_(low, high)
