"""NLVR2 text-assignment (TA) pre-training: which of two images, or neither, a caption is about.

    deepspeed model/train.py --config configs/nlvr_pretrain.yaml --checkpoint ALBEF_4M.pth \
        --deepspeed_config ds_configs/zero2.json [--output-dir DIR] [k=v ...]

The step between pretraining and NLVR2 fine-tuning, on the pretraining shards
(read exactly as pretraining reads them: `PretrainRecipe.train_loader`).
Model: `model.classifier.TextAssignment`, the pretrained weights with every
fusion layer copied into a pair of blocks, a new 3-way `ta_head`; the second
image of each caption is drawn from the batch by ITC image similarity
(`model.classifier.assign_pairs`). No momentum model, no distillation, no
evaluation (as the reference; docs/METHOD.md §10). Export: the reference's TA layout
(`export/albef.pth`), which `configs/nlvr.yaml` fine-tunes from.
"""
from __future__ import annotations

import torch

from model.classifier import TextAssignment
from model.engine.recipe import Recipe
from model.tasks.pretrain import PretrainData, PretrainRecipe
from model.weights.classifier import export_classifier_state_dict, load_classifier_state_dict


class TextAssignmentRecipe(Recipe):
    name = "nlvr_pretrain"
    data_settings = PretrainData
    loss_names = ("loss_ta",)
    train_loader = PretrainRecipe.train_loader
    images = PretrainRecipe.images

    def build_model(self, tokenizer, checkpoint: str | None) -> TextAssignment:
        self.refuse_init_weights()
        m = self.run.model
        if checkpoint is None:
            raise ValueError("text-assignment pre-training starts from a pretraining checkpoint: give --checkpoint")
        from model.weights.files import read_checkpoint
        model = TextAssignment(m)
        state, source = read_checkpoint(checkpoint)
        self._report = str(load_classifier_state_dict(model, state, source))
        return model

    def load_report(self) -> str | None:
        return self._report

    def step(self, module, batch, alpha, generator):
        device = self.env.device
        return module(self.images(batch, device),
                      batch["input_ids"].to(device, non_blocking=True),
                      batch["attention_mask"].to(device, non_blocking=True), generator=generator)

    def export_state_dict(self, module) -> dict[str, torch.Tensor]:
        return export_classifier_state_dict(module)


RECIPE = TextAssignmentRecipe
