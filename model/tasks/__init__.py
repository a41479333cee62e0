"""The task recipes, selected by the config's `task:` key.

Each module named here defines `RECIPE`, a `model.engine.recipe.Recipe`
subclass. Modules are imported on first use, so a task's imports cost nothing
to the others.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from model.engine.config import RunConfig, build_run_config, load_config

RECIPES = {
    "pretrain": "model.tasks.pretrain",
    "retrieval": "model.tasks.retrieval",
    "grounding": "model.tasks.grounding",
    "ve": "model.tasks.ve",
    "nlvr_pretrain": "model.tasks.nlvr_pretrain",
    "nlvr": "model.tasks.nlvr",
    "vqa": "model.tasks.vqa",
}
DEFAULT_TASK = "pretrain"   # configs written before `task:` existed are pretraining configs


def recipe_class(task: str):
    if task not in RECIPES:
        raise ValueError(f"task: {task!r} is unknown; known: {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[task]).RECIPE


def load_run(config: str | Path, overrides: list[str] = (), task: str | None = None):
    """(recipe class, typed RunConfig) of a config file with dotted overrides.

    `task` (from an alias entry such as `python -m model.retrieval`) must agree
    with the config's `task:` when both are given.
    """
    raw = load_config(config, overrides)
    named = raw.get("task")
    if task is not None and named is not None and named != task:
        raise ValueError(f"{config} is a `task: {named}` config; this command runs task {task}")
    raw.setdefault("task", task or DEFAULT_TASK)
    if not isinstance(raw["task"], str):
        raise ValueError(f"task: {raw['task']!r} must be a task name; known: {', '.join(RECIPES)}")
    cls = recipe_class(raw["task"])
    return cls, build_run_config(raw, cls, name=Path(config).stem)


__all__ = ["RECIPES", "recipe_class", "load_run", "RunConfig"]
