"""ALBEF model, training and evaluation. `model.ALBEF` and `model.load_albef` are imported on first
use, so that light modules (`model.engine.config`) don't pull in torch and timm."""


def __getattr__(name: str):
    if name == "ALBEF":
        from model.albef import ALBEF
        return ALBEF
    if name == "load_albef":
        from model.weights.load import load_albef
        return load_albef
    raise AttributeError(f"module 'model' has no attribute {name!r}")
