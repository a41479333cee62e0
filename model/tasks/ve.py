"""SNLI-VE: does the image entail, contradict or leave open the sentence? (docs/METHOD.md §9)

    deepspeed model/train.py --config configs/ve.yaml --checkpoint ALBEF_4M.pth \
        --deepspeed_config ds_configs/zero2.json [--output-dir DIR] [k=v ...]
    python -m model.evaluate --config configs/ve.yaml --checkpoint RUN_OR_FILE [--split test|val] [--output JSON]

One image, three classes in the reference's order (contradiction 0, neutral 1,
entailment 2); the shared classifier recipe does the rest (`model/tasks/classify.py`).
"""
from model.tasks.classify import ClassifyRecipe
from pipeline.classify_data import VE_LABELS


class VERecipe(ClassifyRecipe):
    name = "ve"
    kind = "ve"
    labels = VE_LABELS
    num_images = 1
    select_metric = "val/acc"


RECIPE = VERecipe
