"""Models out: `load_albef` on a 2-rank ZeRO-3 run's checkpoints, and the exports of `python -m model.export`
(albef `.pth`, `.safetensors`, HF-style folder) round-tripping to the same state dict and features.

One 2-rank ZeRO-3 run (ds_configs/zero3_cpu.json) of 3 steps, checkpoints at steps 2 and 3, the export at 3.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from model import load_albef
from model.engine.records import QUEUE_BUFFERS, queue_checksum
from model.export import main as export_main
from model.weights.load import read_weights
from tests.fixtures.training import launch_training, read_records, steps_of

STEPS = 3
MID_STEP = 2
CAPTIONS = ["a red circle at the top left", "a blue square on a green background"]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, train_shards):
    out = tmp_path_factory.mktemp("zero3_models_out")
    launch_training(out, "zero3_cpu.json", train_shards.spec, max_steps=STEPS,
                    overrides=("data.num_workers=0", f"train.checkpoint_every={MID_STEP}"), timeout=900)
    return out


def _ckpt(run_dir, step: int):
    return run_dir / "checkpoints" / f"step{step:09d}"


def _features(loaded) -> tuple[torch.Tensor, ...]:
    """Image and text features and ITM logits of fixed inputs (the feature-extraction one-liners)."""
    images = [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("RGB", (40, 40), (20, 40, 220))]
    with torch.no_grad():
        img_tokens, img_feat = loaded.model.encode_image(loaded.images(images))
        ids, mask = loaded.texts(CAPTIONS)
        txt_tokens, txt_feat = loaded.model.encode_text(ids, mask)
        return img_feat, txt_feat, loaded.model.itm_logits(img_tokens, txt_tokens, mask)


def _assert_same_model(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    for x, y in zip(_features(a), _features(b)):
        assert torch.equal(x, y)


def test_zero3_checkpoint_is_the_export_of_the_same_step(zero3_run):
    """The partitions (trained fp32 groups, frozen momentum fragments, buffers, tied aliases) consolidated
    without a process group equal the live engine's gathered export, tensor for tensor."""
    ckpt, export = read_weights(_ckpt(zero3_run, STEPS)), read_weights(zero3_run / "export" / "albef.pth")
    assert ckpt.step == export.step == STEPS
    assert ckpt.state.keys() == export.state.keys()
    for key, value in export.state.items():
        assert ckpt.state[key].dtype == value.dtype and torch.equal(ckpt.state[key], value), key
    loaded = load_albef(_ckpt(zero3_run, STEPS))
    assert not loaded.model.training
    model, transform, tokenizer = loaded                      # unpacks like open_clip / LAVIS
    assert transform.image_res == 32 and len(tokenizer) == 388
    _assert_same_model(loaded, load_albef(zero3_run))       # the run folder: its export


def test_zero3_mid_run_checkpoint_matches_the_running_module(zero3_run):
    """Step 2's checkpoint against the ranks' own records of step 2: queues, queue pointer, and the
    momentum model summed over both ranks' partitions."""
    records = {rank: steps_of(recs)[MID_STEP] for rank, recs in read_records(zero3_run).items()}
    loaded = load_albef(_ckpt(zero3_run, MID_STEP))
    model = loaded.model
    assert loaded.step == MID_STEP
    assert queue_checksum(model) == pytest.approx(records[0]["queue_checksum"], rel=1e-9)
    assert int(model.queue.queue_ptr) == records[0]["queue_ptr"]
    momentum = sum(p.sum(dtype=torch.float64) for _, m in model.momentum_modules() for p in m.parameters())
    assert float(momentum) == pytest.approx(records[0]["momentum_checksum"] + records[1]["momentum_checksum"],
                                            rel=1e-9)
    later = load_albef(_ckpt(zero3_run, STEPS)).model
    assert not torch.equal(later.itm_head.weight, model.itm_head.weight)   # a different step indeed
    assert all(getattr(model.queue, n).dtype == torch.float32 for n in QUEUE_BUFFERS)


def test_exports_round_trip(zero3_run, tmp_path):
    reference = load_albef(zero3_run)
    ckpt = _ckpt(zero3_run, STEPS)

    st = tmp_path / "albef.safetensors"
    assert export_main([str(ckpt), "--format", "safetensors", "--out", str(st)]) == 0
    weights = read_weights(st)
    # the tied aliases are stored once and come back as the very same tensor
    decoder = "text_encoder.cls.predictions.decoder.weight"
    assert weights.state[decoder] is weights.state["text_encoder.bert.embeddings.word_embeddings.weight"]
    assert weights.state.keys() == read_weights(ckpt).state.keys()
    assert weights.step == STEPS
    _assert_same_model(load_albef(st), reference)

    assert export_main([str(zero3_run), "--format", "hf-folder", "--out", str(tmp_path / "hf")]) == 0
    hf = tmp_path / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= {p.name for p in hf.iterdir()}
    config = json.loads((hf / "config.json").read_text())
    assert config["text"]["tokenizer"] == "." and config["vision"]["image_res"] == 32
    from_hf = load_albef(hf)
    assert from_hf.tokenizer(CAPTIONS)["input_ids"] == reference.tokenizer(CAPTIONS)["input_ids"]
    _assert_same_model(from_hf, reference)

    pth = tmp_path / "again.pth"
    assert export_main([str(hf), "--format", "albef", "--out", str(pth)]) == 0
    _assert_same_model(load_albef(pth), reference)


def test_export_refuses_bad_sources(tmp_path, capsys):
    assert export_main([str(tmp_path / "absent"), "--format", "safetensors", "--out", str(tmp_path / "x")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert export_main([str(tmp_path / "empty"), "--format", "albef"]) == 2   # no default --out for it
