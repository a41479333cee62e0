"""Weights in other layouts: released ALBEF checkpoints (docs/METHOD.md §7), Hugging Face BERT,
timm/DeiT ViT, and position-embedding resizing."""
import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.albef import ALBEF
from model.weights import build_albef
from model.weights.released import (CheckpointMismatchError, export_albef_state_dict, load_albef_state_dict,
                              resize_pos_embed)
from model.engine.config import load_config
from tests.fixtures.model import BASE_CONFIG

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def spec_albef_shapes(cfg: dict) -> dict[str, tuple]:
    """Key -> shape of a released pretraining checkpoint, written from the names in docs/METHOD.md §7."""
    v, t = cfg["vision"], cfg["text"]
    W, depth, p, grid = v["width"], v["depth"], v["patch_size"], v["image_res"] // v["patch_size"]
    mlp = int(v["mlp_ratio"] * W)
    H, inter, V, P, T = (t["hidden_size"], t["intermediate_size"], t["vocab_size"],
                         t["max_position_embeddings"], t["type_vocab_size"])
    k, n = t["num_text_layers"], t["num_text_layers"] + t["num_fusion_layers"]
    E, Q = cfg["embed_dim"], cfg["queue_size"]
    out = {}

    def linear(name, n_out, n_in):
        out[f"{name}.weight"], out[f"{name}.bias"] = (n_out, n_in), (n_out,)

    def norm(name, width):
        out[f"{name}.weight"], out[f"{name}.bias"] = (width,), (width,)

    for enc in ("visual_encoder", "visual_encoder_m"):
        out[f"{enc}.cls_token"], out[f"{enc}.pos_embed"] = (1, 1, W), (1, 1 + grid * grid, W)
        out[f"{enc}.patch_embed.proj.weight"], out[f"{enc}.patch_embed.proj.bias"] = (W, 3, p, p), (W,)
        for b in range(depth):
            blk = f"{enc}.blocks.{b}"
            norm(f"{blk}.norm1", W)
            linear(f"{blk}.attn.qkv", 3 * W, W)
            linear(f"{blk}.attn.proj", W, W)
            norm(f"{blk}.norm2", W)
            linear(f"{blk}.mlp.fc1", mlp, W)
            linear(f"{blk}.mlp.fc2", W, mlp)
        norm(f"{enc}.norm", W)
    for enc in ("text_encoder", "text_encoder_m"):
        emb = f"{enc}.bert.embeddings"
        out[f"{emb}.word_embeddings.weight"] = (V, H)
        out[f"{emb}.position_embeddings.weight"] = (P, H)
        out[f"{emb}.token_type_embeddings.weight"] = (T, H)
        out[f"{emb}.position_ids"] = (1, P)
        norm(f"{emb}.LayerNorm", H)
        for i in range(n):
            layer = f"{enc}.bert.encoder.layer.{i}"
            for part in ("query", "key", "value"):
                linear(f"{layer}.attention.self.{part}", H, H)
            linear(f"{layer}.attention.output.dense", H, H)
            norm(f"{layer}.attention.output.LayerNorm", H)
            linear(f"{layer}.intermediate.dense", inter, H)
            linear(f"{layer}.output.dense", H, inter)
            norm(f"{layer}.output.LayerNorm", H)
            if i >= k:
                linear(f"{layer}.crossattention.self.query", H, H)
                linear(f"{layer}.crossattention.self.key", H, W)
                linear(f"{layer}.crossattention.self.value", H, W)
                linear(f"{layer}.crossattention.output.dense", H, H)
                norm(f"{layer}.crossattention.output.LayerNorm", H)
        head = f"{enc}.cls.predictions"
        out[f"{head}.bias"] = (V,)
        linear(f"{head}.transform.dense", H, H)
        norm(f"{head}.transform.LayerNorm", H)
        linear(f"{head}.decoder", V, H)
    for proj, width in (("vision_proj", W), ("text_proj", H)):
        linear(proj, E, width)
        linear(f"{proj}_m", E, width)
    linear("itm_head", 2, H)
    out["temp"], out["image_queue"], out["text_queue"], out["queue_ptr"] = (), (E, Q), (E, Q), (1,)
    return out


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_tiny_export_has_exactly_the_spec_layout(tiny_albef, tiny_model_cfg):
    sd = export_albef_state_dict(tiny_albef)
    assert _shapes(sd) == spec_albef_shapes(tiny_model_cfg)
    assert sd["queue_ptr"].dtype == torch.long and sd["text_encoder.bert.embeddings.position_ids"].dtype == torch.long


@pytest.mark.timeout(60)
def test_base_export_has_exactly_the_spec_layout():
    cfg = load_config(BASE_CONFIG)["model"]
    cfg["vision"]["init"] = cfg["text"]["init"] = None
    with torch.device("meta"):  # shapes only: nothing of the ~420M parameters is allocated
        model = ALBEF(cfg)
    sd = export_albef_state_dict(model)
    assert _shapes(sd) == spec_albef_shapes(cfg)
    assert sd["visual_encoder.pos_embed"].shape == (1, 257, 768)
    assert sd["text_encoder.bert.encoder.layer.11.crossattention.self.key.weight"].shape == (768, 768)
    assert "text_encoder.bert.encoder.layer.5.crossattention.self.key.weight" not in sd
    trainable = sum(p.numel() for p in model.trainable_parameters())
    assert 200e6 < trainable < 220e6  # ViT-B/16 + BERT-base + 6 cross-attentions + heads


def _spec_state_dict(cfg, seed):
    """Random tensors under the spec's names and shapes, tied as in the released files."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=g) for k, shape in spec_albef_shapes(cfg).items()}
    for enc in ("text_encoder", "text_encoder_m"):
        sd[f"{enc}.bert.embeddings.position_ids"] = torch.arange(cfg["text"]["max_position_embeddings"])[None]
        sd[f"{enc}.cls.predictions.decoder.weight"] = sd[f"{enc}.bert.embeddings.word_embeddings.weight"]
        sd[f"{enc}.cls.predictions.decoder.bias"] = sd[f"{enc}.cls.predictions.bias"]
    sd["queue_ptr"] = torch.tensor([16])
    sd["temp"] = torch.tensor(0.05)
    return sd


def test_spec_layout_to_ours_to_spec_layout_is_lossless(tiny_albef, tiny_model_cfg):
    released = _spec_state_dict(tiny_model_cfg, seed=0)
    report = load_albef_state_dict(tiny_albef, {"model": released, "optimizer": {}, "epoch": 3})
    assert not report.missing and not report.resized
    assert set(report.unexpected) == {"text_encoder.bert.embeddings.position_ids",
                                      "text_encoder_m.bert.embeddings.position_ids"}
    back = export_albef_state_dict(tiny_albef)
    assert back.keys() == released.keys()
    for key, value in released.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_ours_to_released_to_ours_is_lossless(tiny_albef, tiny_model_cfg, tiny_batch):
    tiny_albef(tiny_batch["image"], tiny_batch["input_ids"], tiny_batch["attention_mask"], alpha=0.4)
    exported = export_albef_state_dict(tiny_albef)
    torch.manual_seed(1)
    other = ALBEF(tiny_model_cfg)
    load_albef_state_dict(other, exported)
    for (key, a), (key_b, b) in zip(tiny_albef.state_dict().items(), other.state_dict().items()):
        assert key == key_b and torch.equal(a, b), key
    assert other.queue.queue_ptr.item() == 8


def test_expected_differences_are_loaded_and_explained(tiny_model_cfg):
    released = _spec_state_dict(tiny_model_cfg, seed=0)
    # a retrieval model from a pretraining checkpoint: no idx_queue, an MLM head it does not have
    cfg = copy.deepcopy(tiny_model_cfg)
    cfg["retrieval"] = True
    report = load_albef_state_dict(ALBEF(cfg), released)
    assert report.missing == {"queue.idx_queue": "pretraining checkpoint has no image-id queue: starts empty (-100)"}
    assert "text_encoder.cls.predictions.transform.dense.weight" in report.unexpected
    # a pretraining model from a retrieval checkpoint's idx_queue
    with_idx = dict(released, idx_queue=torch.zeros(1, tiny_model_cfg["queue_size"], dtype=torch.long))
    report = load_albef_state_dict(ALBEF(tiny_model_cfg), with_idx)
    assert "unused in pretraining" in report.unexpected["idx_queue"]
    # no momentum copies at all: copied from the online weights
    online_only = {k: v for k, v in released.items() if "_m." not in k}
    model = ALBEF(tiny_model_cfg)
    report = load_albef_state_dict(model, online_only)
    assert report.missing and all("momentum" in r for r in report.missing.values())
    assert torch.equal(model.visual_encoder_m.blocks[0].attn.qkv.weight, model.visual_encoder.blocks[0].attn.qkv.weight)
    assert torch.equal(model.text_encoder_m.embeddings.word_embeddings.weight,
                       released["text_encoder.bert.embeddings.word_embeddings.weight"])
    # another queue size: fresh queues, everything else loaded
    small_queue = dict(released, image_queue=released["image_queue"][:, :32], text_queue=released["text_queue"][:, :32])
    report = load_albef_state_dict(ALBEF(tiny_model_cfg), small_queue)
    assert "another size" in report.unexpected["image_queue"]


def test_position_embeddings_are_resized_for_another_resolution(tiny_model_cfg):
    released = _spec_state_dict(tiny_model_cfg, seed=0)
    cfg = copy.deepcopy(tiny_model_cfg)
    cfg["vision"]["image_res"] = 48  # grid 4 -> 6
    model = ALBEF(cfg)
    report = load_albef_state_dict(model, released)
    assert set(report.resized) == {"visual_encoder.pos_embed", "visual_encoder_m.pos_embed"}
    for prefix in ("visual_encoder", "visual_encoder_m"):
        old = released[f"{prefix}.pos_embed"]
        new = model.state_dict()[f"{prefix}.pos_embed"]
        assert new.shape == (1, 37, 64)
        assert torch.equal(new[:, 0], old[:, 0])  # CLS kept
        grid = old[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
        expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
        assert torch.allclose(new[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 36, 64), atol=1e-6)


def test_resize_pos_embed_keeps_cls_and_constants():
    pos = torch.cat([torch.full((1, 1, 8), 3.0), torch.full((1, 14 * 14, 8), -1.5)], dim=1)
    out = resize_pos_embed(pos, 16)
    assert out.shape == (1, 1 + 256, 8)
    assert torch.equal(out[:, 0], pos[:, 0])
    assert torch.allclose(out[:, 1:], torch.tensor(-1.5), atol=1e-5)  # bicubic weights sum to one
    assert resize_pos_embed(pos, 14) is pos
    with pytest.raises(ValueError, match="not a square grid"):
        resize_pos_embed(pos[:, :-1], 16)


def test_unexplained_keys_and_shapes_are_refused(tiny_model_cfg):
    released = _spec_state_dict(tiny_model_cfg, seed=0)
    extra = dict(released, **{"visual_encoder.blocks.7.norm1.weight": torch.ones(64)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected.*visual_encoder\.blocks\.7\.norm1\.weight"):
        load_albef_state_dict(ALBEF(tiny_model_cfg), extra)
    with pytest.raises(CheckpointMismatchError, match=r"missing.*itm_head\.weight"):
        load_albef_state_dict(ALBEF(tiny_model_cfg), {k: v for k, v in released.items() if k != "itm_head.weight"})
    wide = dict(released, **{"text_proj.weight": torch.zeros(32, 128)})
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch.*text_proj\.weight"):
        load_albef_state_dict(ALBEF(tiny_model_cfg), wide)
    untied = dict(released, **{"text_encoder.cls.predictions.decoder.weight": torch.zeros(388, 64)})
    with pytest.raises(CheckpointMismatchError, match="tied"):
        load_albef_state_dict(ALBEF(tiny_model_cfg), untied)
    # a fine-tuned (retrieval) checkpoint has no MLM head: a pretraining model cannot use it
    cfg = copy.deepcopy(tiny_model_cfg)
    cfg["retrieval"] = True
    finetuned = export_albef_state_dict(ALBEF(cfg))
    assert "text_encoder.embeddings.word_embeddings.weight" in finetuned  # `bert.` stripped as the reference
    with pytest.raises(CheckpointMismatchError, match=r"missing.*mlm_head"):
        load_albef_state_dict(ALBEF(tiny_model_cfg), finetuned)
    load_albef_state_dict(ALBEF(cfg), finetuned)


def test_local_hf_bert_loads_layer_by_layer(tiny_model_cfg, hf_bert_dir):
    from transformers import BertForMaskedLM
    tiny_model_cfg["text"]["init"] = str(hf_bert_dir)
    model = build_albef(tiny_model_cfg).eval()
    report = model.init_reports[0]
    cross = {k for k in model.text_encoder.state_dict() if ".cross_attn." in k}
    assert len(cross) == 2 * 10 and set(report.missing) == cross
    assert all("fresh" in r for r in report.missing.values())
    hf_sd = load_file(str(hf_bert_dir / "model.safetensors"))
    te = model.text_encoder
    pairs = {
        "bert.embeddings.word_embeddings.weight": te.embeddings.word_embeddings.weight,
        "bert.embeddings.LayerNorm.weight": te.embeddings.norm.weight,
        "bert.encoder.layer.0.attention.self.query.weight": te.text_layers[0].self_attn.query.weight,
        "bert.encoder.layer.1.output.dense.bias": te.text_layers[1].ffn.dense_out.bias,
        "bert.encoder.layer.2.attention.output.LayerNorm.bias": te.fusion_layers[0].self_attn.norm.bias,
        "bert.encoder.layer.3.intermediate.dense.weight": te.fusion_layers[1].ffn.dense_in.weight,
        "cls.predictions.bias": te.mlm_head.decoder.bias,
        "cls.predictions.transform.dense.weight": te.mlm_head.dense.weight,
    }
    for key, ours in pairs.items():
        assert torch.equal(hf_sd[key], ours), key
    momentum_query = model.text_encoder_m.text_layers[0].self_attn.query.weight
    assert torch.equal(momentum_query, te.text_layers[0].self_attn.query.weight)

    # numerically BERT: text layers == HF's hidden state after layer k; the MLM head == HF's
    hf = BertForMaskedLM.from_pretrained(hf_bert_dir).eval()
    ids = torch.tensor([[2, 30, 40, 50, 60], [2, 70, 80, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = hf.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ours, _ = model.encode_text(ids, mask)
        k = tiny_model_cfg["text"]["num_text_layers"]
        assert torch.allclose(ours[mask.bool()], hidden[k][mask.bool()], atol=1e-5)
        assert torch.allclose(te.mlm_head(hidden[-1]), hf.cls(hidden[-1]), atol=1e-5)


def test_bertmodel_checkpoint_without_head_loads_with_reasons(tiny_model_cfg, hf_bertmodel_dir):
    tiny_model_cfg["text"]["init"] = str(hf_bertmodel_dir)
    report = build_albef(tiny_model_cfg).init_reports[0]
    assert any(k.startswith("bert.pooler.") for k in report.unexpected)
    assert any("no MLM head" in r for r in report.missing.values())


def test_hf_checkpoint_with_unknown_tensors_is_refused(tiny_model_cfg, hf_bert_dir, tmp_path):
    sd = load_file(str(hf_bert_dir / "model.safetensors"))
    sd["bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(4)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_bert_dir / "config.json").read_text())
    tiny_model_cfg["text"]["init"] = str(tmp_path)
    with pytest.raises(CheckpointMismatchError, match="rotary"):
        build_albef(tiny_model_cfg)


def test_local_deit_file_loads_with_position_embedding_resized(tiny_model_cfg, deit_checkpoint):
    tiny_model_cfg["vision"]["init"] = str(deit_checkpoint)
    model = build_albef(tiny_model_cfg)
    report = model.init_reports[0]
    assert set(report.unexpected) == {"head.weight", "head.bias"}
    assert report.resized == {"pos_embed": "(1, 5, 64) -> (1, 17, 64)"}
    assert not report.missing
    deit = torch.load(deit_checkpoint, weights_only=True)["model"]
    ours = model.visual_encoder.state_dict()
    for key, value in deit.items():
        if key.startswith("head."):
            continue
        if key == "pos_embed":
            assert torch.equal(ours[key][:, 0], value[:, 0])
            assert torch.allclose(ours[key], resize_pos_embed(value, 4))
        else:
            assert torch.equal(ours[key], value), key
    assert torch.equal(model.visual_encoder_m.pos_embed, model.visual_encoder.pos_embed)
