"""ALBEF model, training and evaluation. `model.ALBEF` is imported on first use,
so that light modules (`model.engine.config`) don't pull in torch and timm."""


def __getattr__(name: str):
    if name == "ALBEF":
        from model.albef import ALBEF
        return ALBEF
    raise AttributeError(f"module 'model' has no attribute {name!r}")
