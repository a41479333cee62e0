"""Run configuration: YAML files with `model`, `data`, `train` sections.

A file may name a parent with `inherit: other.yaml` (relative to itself), or
several (`inherit: [a.yaml, b.yaml]`, merged in that order); the child is
deep-merged over its parents. Command-line overrides are dotted
`key=value` pairs whose values are parsed as YAML (`train.lr=3e-4`,
`data.shards=[a,b]`). The resolved dict is what a run records in its folder.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Iterable

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.2), not as the string PyYAML's 1.1 rules give."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?
               |[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def deep_merge(base: dict, override: dict) -> dict:
    """Return `base` with `override` merged in; nested dicts merge, the rest replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read(path: Path, seen: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in seen:
        raise ValueError(f"config inheritance loops through {path}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = parse_yaml(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a mapping at the top level")
    parents = data.pop("inherit", None) or []
    merged: dict = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = deep_merge(merged, _read(path.parent / parent, seen + (path,)))
    return deep_merge(merged, data)


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Apply dotted `a.b.c=value` overrides; an unknown top-level section is refused."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = cfg
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        node[parts[-1]] = parse_yaml(raw)
    return cfg


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """Read a YAML config (following `inherit`) and apply dotted overrides."""
    return apply_overrides(_read(Path(path), ()), overrides)


def save_config(cfg: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
