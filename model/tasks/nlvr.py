"""NLVR2: is the sentence true of the image pair? (docs/METHOD.md §10)

    deepspeed model/train.py --config configs/nlvr.yaml --checkpoint TA_RUN_OR_FILE \
        --deepspeed_config ds_configs/zero2.json [--output-dir DIR] [k=v ...]
    python -m model.evaluate --config configs/nlvr.yaml --checkpoint RUN_OR_FILE [--split test|dev] [--output JSON]

Two images, two classes (False 0, True 1), fusion layers doubled into pair
blocks (`model.classifier.PairFusionEncoder`). Start from the text-assignment
checkpoint (`configs/nlvr_pretrain.yaml`) or directly from a pretraining one
(its fusion layers are copied into both blocks of each pair). The TA checkpoint
has no momentum copies: `train.teacher_init` says where the teacher starts
(`model/weights/classifier.py`). Everything else: `model/tasks/classify.py`.
"""
from dataclasses import dataclass

from model.tasks.classify import ClassifyRecipe, ClassifyTrain
from model.weights.classifier import TEACHER_INITS
from pipeline.classify_data import NLVR_LABELS


@dataclass
class NLVRTrain(ClassifyTrain):
    # after_load: teacher = the loaded student; reference: the teacher keeps the pre-load initialisation
    teacher_init: str = "after_load"

    def check(self, where: str) -> None:
        super().check(where)
        if self.teacher_init not in TEACHER_INITS:
            raise ValueError(f"{where}.teacher_init={self.teacher_init!r}: one of {', '.join(TEACHER_INITS)}")


class NLVRRecipe(ClassifyRecipe):
    name = "nlvr"
    kind = "nlvr"
    labels = NLVR_LABELS
    num_images = 2
    select_metric = "dev/acc"
    train_settings = NLVRTrain

    def teacher_init(self) -> str:
        return self.run.train.teacher_init


RECIPE = NLVRRecipe
