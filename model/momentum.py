"""Momentum (EMA) copies of the online encoders: `p_m <- m * p_m + (1 - m) * p`.

The copies are frozen (no gradient, never given to the optimiser) and must
stay fp32: an EMA step of 0.005 * (p - p_m) mostly rounds away in bf16. Under
DeepSpeed ZeRO-3 a parameter's `data` is an empty placeholder and its local
partition is `p.ds_tensor`; online and momentum copies have the same shapes,
so they are partitioned alike and the update runs shard by shard on the
partitions (no gather needed).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn


def make_momentum_copies(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """Frozen deep copies, made in one call so weights tied across/inside modules stay tied."""
    copies = copy.deepcopy(list(modules))
    for module in copies:
        for p in module.parameters():
            p.requires_grad_(False)
    return copies


def parameter_pairs(pairs: Sequence[tuple[nn.Module, nn.Module]]) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(online, momentum) parameters of all pairs, each shared (tied) parameter once."""
    out, seen = [], set()
    for online, momentum in pairs:
        online_params, momentum_params = list(online.parameters()), list(momentum.parameters())
        if len(online_params) != len(momentum_params):
            raise ValueError(f"momentum copy of {type(online).__name__} has {len(momentum_params)} "
                             f"parameters, the online module {len(online_params)}")
        for p, p_m in zip(online_params, momentum_params):
            if id(p) not in seen:
                seen.add(id(p))
                out.append((p, p_m))
    return out


def _local(p: nn.Parameter) -> torch.Tensor:
    """The tensor this rank owns: the ZeRO-3 partition if there is one, else the full data."""
    shard = getattr(p, "ds_tensor", None)
    return shard.data if shard is not None else p.data


@torch.no_grad()
def ema_update(pairs: Sequence[tuple[nn.Parameter, nn.Parameter]], momentum: float) -> None:
    """One EMA step on every pair: p_m += (1 - m) * (p - p_m), computed in fp32."""
    sources, targets = [], []
    for p, p_m in pairs:
        src, dst = _local(p), _local(p_m)
        if dst.dtype != torch.float32:
            raise RuntimeError(f"momentum parameter is {dst.dtype}, not float32: EMA steps of "
                               f"(1-m)*(p-p_m) round away in low precision. DeepSpeed's 'bf16' mode casts "
                               "all parameters; use its torch_autocast mode, which keeps them fp32")
        if src.shape != dst.shape:
            raise RuntimeError(f"online and momentum partitions differ in shape ({tuple(src.shape)} vs "
                               f"{tuple(dst.shape)}): both copies must be partitioned the same way")
        if dst.numel():
            sources.append(src.to(dst.dtype))
            targets.append(dst)
    if targets:
        torch._foreach_lerp_(targets, sources, 1.0 - momentum)


@torch.no_grad()
def copy_online_to_momentum(pairs: Sequence[tuple[nn.Parameter, nn.Parameter]]) -> None:
    """Make every momentum parameter equal to its online parameter (partition by partition)."""
    for p, p_m in pairs:
        _local(p_m).copy_(_local(p))


class MomentumModel(nn.Module):
    """What every model with momentum copies shares: subclasses list their (online, momentum)
    module pairs in `momentum_modules` and have `settings.momentum`; the optimiser gets every
    other parameter."""

    def momentum_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        return []

    def _momentum_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """The (online, momentum) parameter pairs, listed once: the Parameter objects never change
        (device moves and ZeRO-3 partitioning work in place), and listing them costs ms per forward."""
        if getattr(self, "_pairs_cache", None) is None:
            self._pairs_cache = parameter_pairs(self.momentum_modules())
        return self._pairs_cache

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Everything the optimiser updates: all parameters except the momentum copies (and frozen ones)."""
        frozen = {id(p) for _, momentum in self.momentum_modules() for p in momentum.parameters()}
        return [(name, p) for name, p in self.named_parameters() if id(p) not in frozen and p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.trainable_named_parameters()]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """One EMA step p_m <- m p_m + (1-m) p on every pair (ZeRO-3 partitions updated in place)."""
        ema_update(self._momentum_pairs(), self.settings.momentum)

    @torch.no_grad()
    def copy_online_to_momentum(self) -> None:
        copy_online_to_momentum(self._momentum_pairs())
