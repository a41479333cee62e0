"""Run configuration: YAML files with `task`, `model`, `train`, `data`, `eval` (+ task) sections.

A file may name a parent with `inherit: other.yaml` (relative to itself), or
several (`inherit: [a.yaml, b.yaml]`, merged in that order); the child is
deep-merged over its parents. Command-line overrides are dotted
`key=value` pairs whose values are parsed as YAML (`train.lr=3e-4`,
`data.shards=[a,b]`). The resolved dict, with `${VAR}` references left as
written (credentials in them stay out of the run folder), is what a run records.

`build_run_config` then types it: `${VAR}` / `${VAR:-default}` are expanded
once, here, and every section is built into the recipe's dataclasses, so a typo
(`train.lrr=5e-4`, `trian.lr=...`) or a wrong type (`train.lr=abc`) stops the
run with one line naming the setting and the closest known one.
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from model.settings import build_settings, unknown_key_message


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
    """Apply dotted `a.b.c=value` overrides in order (a later one wins: defaults, then the user's);
    an unknown top-level section and a key repeated in adjacent overrides (what an unquoted brace
    pattern becomes in a shell) are refused."""
    cfg = copy.deepcopy(cfg)
    overrides = list(overrides)
    keys = [item.split("=", 1)[0].strip() for item in overrides]
    for before, key in zip(keys, keys[1:]):
        if key == before:   # the shell writes an unquoted brace pattern as adjacent words, the last would win
            raise ValueError(f"override {key} is given {keys.count(key)} times in a row; a brace pattern the "
                             f"shell expanded? quote it: '{key}=...{{000..009}}.tar'")
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


_ENV_REF = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(text: str, env: Mapping[str, str] = os.environ) -> str:
    """Replace `${VAR}` and `${VAR:-default}` in a setting; an unset VAR without default is an error."""
    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is None:
            raise ValueError(f"setting {text!r} refers to ${{{name}}}, which is not set")
        return default

    return _ENV_REF.sub(sub, text)


def expand_tree(value: Any, env: Mapping[str, str] = os.environ) -> Any:
    """`expand_env` applied to every string of a config tree (a copy)."""
    if isinstance(value, str):
        return expand_env(value, env)
    if isinstance(value, dict):
        return {k: expand_tree(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_tree(v, env) for v in value]
    return value


@dataclass
class RunConfig:
    """A run's configuration: typed sections plus the dict as written (for the run folder)."""
    raw: dict                       # inheritance and overrides applied, ${VAR} unexpanded
    name: str                       # the config file's stem (names result files)
    task: str
    model: dict                     # expanded; checked by the recipe's model settings class
    train: Any                      # the recipe's TrainSettings subclass
    data: Any                       # DataSettings subclass
    eval: Any = None                # EvalSettings subclass or None
    sections: dict[str, Any] = field(default_factory=dict)   # the recipe's own sections


def build_run_config(raw: dict, recipe, name: str = "config") -> RunConfig:
    """Type `raw` with the section classes of `recipe` (a Recipe subclass); ValueError names the setting."""
    known = {"task", "model", "train", "data", "eval", *recipe.task_settings}
    for key in raw:
        if key not in known or (key == "eval" and recipe.eval_settings is None):
            if key == "inherit":
                raise ValueError("`inherit:` must be a list of file names at the top of a config file")
            raise ValueError(unknown_key_message(key, key, sorted(known - ({"eval"} if recipe.eval_settings is None
                                                                         else set()))))
    cfg = expand_tree(raw)
    if not isinstance(cfg.get("model"), dict):
        raise ValueError("config has no `model:` section")
    build_settings(recipe.model_settings, cfg["model"], "model")
    return RunConfig(
        raw=raw, name=name, task=recipe.name, model=cfg["model"],
        train=build_settings(recipe.train_settings, cfg.get("train") or {}, "train"),
        data=build_settings(recipe.data_settings, cfg.get("data") or {}, "data"),
        eval=build_settings(recipe.eval_settings, cfg.get("eval") or {}, "eval") if recipe.eval_settings else None,
        sections={name: build_settings(cls, cfg.get(name) or {}, name) for name, cls in recipe.task_settings.items()},
    )
