"""Where retrieval weights come from: released-layout files, run folders, DeepSpeed checkpoint folders."""
import copy

import pytest
import torch

from model.albef import ALBEF
from model.weights.released import export_albef_state_dict
from model.engine.checkpointing import EXTRA_STATE
from model.weights.files import (ZERO3_MODULE_FILE, ZERO012_MODULE_FILE, load_retrieval_weights,
                                     retrieval_model_config)


def _retrieval_model(tiny_cfg, tiny_tokenizer, image_res=None):
    cfg = copy.deepcopy(tiny_cfg)
    if image_res is not None:
        cfg["model"]["vision"]["image_res"] = image_res
    return ALBEF(retrieval_model_config(cfg["model"], tiny_tokenizer))


def _same_online_weights(a: ALBEF, b: ALBEF) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(("text_encoder.", "vision_proj", "itm_head")))


def test_pretraining_file_loads_into_retrieval_model_at_another_resolution(tmp_path, tiny_cfg, tiny_tokenizer):
    torch.manual_seed(0)
    pretrained = ALBEF(tiny_cfg["model"])
    path = tmp_path / "ALBEF_tiny.pth"
    torch.save({"model": export_albef_state_dict(pretrained), "epoch": 3}, path)
    res = 2 * tiny_cfg["model"]["vision"]["image_res"]
    model = _retrieval_model(tiny_cfg, tiny_tokenizer, image_res=res)
    report, source = load_retrieval_weights(model, path)
    assert source == str(path)
    assert set(report.resized) == {"visual_encoder.pos_embed", "visual_encoder_m.pos_embed"}
    assert "queue.idx_queue" in report.missing
    assert any("cls.predictions" in k for k in report.unexpected)  # MLM head: not in a retrieval model
    assert _same_online_weights(model, pretrained)
    assert model.settings.retrieval and model.queue.idx_queue.eq(-100).all()


def test_finetuned_layout_without_bert_prefix(tmp_path, tiny_cfg, tiny_tokenizer):
    torch.manual_seed(1)
    finetuned = _retrieval_model(tiny_cfg, tiny_tokenizer)
    sd = export_albef_state_dict(finetuned)
    assert not any(k.startswith("text_encoder.bert.") for k in sd)   # as flickr30k.pth / mscoco.pth
    path = tmp_path / "flickr_tiny.pth"
    torch.save(sd, path)   # a bare state dict, no {"model": ...}
    model = _retrieval_model(tiny_cfg, tiny_tokenizer)
    report, _ = load_retrieval_weights(model, path)
    assert not report.missing and _same_online_weights(model, finetuned)
    assert torch.equal(model.queue.idx_queue, finetuned.queue.idx_queue)


def test_run_folder_and_deepspeed_checkpoint_folder(tmp_path, tiny_cfg, tiny_tokenizer):
    torch.manual_seed(2)
    trained = ALBEF(tiny_cfg["model"])
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step000000010"
    tag.mkdir(parents=True)
    module_state = trained.state_dict()
    module_state["temp"] = module_state["temp"].view(1)   # as the trainer hands it to DeepSpeed
    torch.save({"module": module_state}, tag / ZERO012_MODULE_FILE)
    torch.save({"config": tiny_cfg, "step": 10}, tag / EXTRA_STATE)
    (run / "checkpoints" / "latest").write_text(tag.name)
    for where in (run, tag):   # newest checkpoint of a run folder, or the folder itself
        model = _retrieval_model(tiny_cfg, tiny_tokenizer)
        _, source = load_retrieval_weights(model, where)
        assert source == str(tag) and _same_online_weights(model, trained)
        assert model.temp.item() == pytest.approx(trained.temp.item())
    # An export in the run folder wins over its checkpoints.
    (run / "export").mkdir()
    torch.save({"model": export_albef_state_dict(trained)}, run / "export" / "albef.pth")
    _, source = load_retrieval_weights(_retrieval_model(tiny_cfg, tiny_tokenizer), run)
    assert source == str(run / "export" / "albef.pth")


def test_unusable_checkpoints_fail_with_the_reason(tmp_path, tiny_cfg, tiny_tokenizer):
    model = _retrieval_model(tiny_cfg, tiny_tokenizer)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_retrieval_weights(model, tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match="neither export/albef.pth nor a complete checkpoint"):
        load_retrieval_weights(model, tmp_path)
    zero3 = tmp_path / "z3"
    zero3.mkdir()
    torch.save({}, zero3 / ZERO3_MODULE_FILE)
    torch.save({"config": tiny_cfg}, zero3 / EXTRA_STATE)
    with pytest.raises(ValueError, match="ZeRO-3 checkpoint holds only parameter partitions"):
        load_retrieval_weights(model, zero3)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read as a PyTorch checkpoint"):
        load_retrieval_weights(model, junk)
