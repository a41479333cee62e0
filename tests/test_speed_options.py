"""The GPU-speed options: `model.compile`, `eval.precision`, and the DeepSpeed communication-dtype keys."""
import json
from pathlib import Path

import pytest
import torch

from model.albef import ALBEF, compile_encoders
from model.engine.config import load_config
from model.engine.ds_config import BatchPlan, resolve_ds_config
from model.settings import ALBEFSettings
from model.tasks.retrieval import RetrievalEval
from model.tasks.retrieval_eval import Features, eval_autocast, itc_similarity, rerank

REPO = Path(__file__).resolve().parents[1]
PLAN = BatchPlan(micro_batch=64, grad_accum=1, world_size=8, queue_size=65536)


def _tiny_cfg() -> dict:
    return load_config(REPO / "configs" / "tiny.yaml")["model"]


def test_compile_flag_defaults_off_and_compiles_encoders_in_place(monkeypatch):
    assert ALBEFSettings.from_dict(_tiny_cfg()).compile is False
    called = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: called.append(self))
    plain = ALBEF(_tiny_cfg())
    assert called == []
    cfg = _tiny_cfg()
    cfg["compile"] = True
    model = ALBEF(cfg)
    s = model.settings
    # ViT online + momentum, and every text and fusion layer of both text encoders
    assert len(called) == 2 + 2 * (s.text.num_text_layers + s.text.num_fusion_layers)
    assert model.visual_encoder in called and model.text_encoder_m.fusion_layers[-1] in called
    assert list(model.state_dict()) == list(plain.state_dict())     # names unchanged
    cfg["compile"] = "yes"
    with pytest.raises(ValueError, match="model.compile"):
        ALBEF(cfg)


def test_compile_encoders_on_a_module_without_momentum_copies(monkeypatch):
    called = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: called.append(self))
    model = ALBEF(_tiny_cfg())
    del model.visual_encoder_m, model.text_encoder_m
    assert len(compile_encoders(model)) == 1 + 4 == len(called)


def test_eval_precision_setting_is_checked():
    RetrievalEval(precision="bf16").check("eval")
    with pytest.raises(ValueError, match="eval.precision"):
        RetrievalEval(precision="fp16").check("eval")
    with pytest.raises(ValueError, match="eval.precision"):
        eval_autocast(torch.device("cpu"), "half")


def test_bf16_rerank_close_to_fp32_and_actually_in_bf16():
    cfg = _tiny_cfg()
    cfg["retrieval"] = True
    torch.manual_seed(0)
    model = ALBEF(cfg).eval()
    g = torch.Generator().manual_seed(1)
    image = torch.randn(4, 3, 32, 32, generator=g)
    ids = torch.randint(5, 388, (8, 8), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    with torch.no_grad():
        img_tok, img_feat = model.encode_image(image)
        txt_tok, txt_feat = model.encode_text(ids, mask)
    f = Features(img_tok, img_feat, txt_tok, mask, txt_feat, torch.ones(4, dtype=torch.bool),
                 torch.ones(8, dtype=torch.bool))
    sims = itc_similarity(f)        # the same candidates for both precisions
    scores, dtypes = {}, {}
    for precision in ("fp32", "bf16"):
        with torch.no_grad(), eval_autocast(torch.device("cpu"), precision):
            dtypes[precision] = model.itm_head(txt_tok[:, 0]).dtype   # a Linear: bf16 under autocast
            scores[precision] = rerank(model, f, sims, k=3)
    assert dtypes == {"fp32": torch.float32, "bf16": torch.bfloat16}
    for fp32, bf16 in zip(scores["fp32"], scores["bf16"]):
        assert fp32.dtype == bf16.dtype
        assert ((fp32 == -100) == (bf16 == -100)).all()
        assert abs(fp32 - bf16).max() < 0.05
        assert (fp32 != bf16).any()


def test_retrieval_recipe_passes_eval_precision(monkeypatch):
    from model.tasks import load_run
    from model.tasks import retrieval_eval
    seen = {}
    monkeypatch.setattr(retrieval_eval, "evaluate", lambda *a, **k: seen.update(k) or ("r", {}, None))
    recipe_cls, run = load_run(REPO / "configs" / "retrieval_flickr.yaml", ["eval.precision=bf16"])
    recipe = recipe_cls(run, type("Env", (), {"device": torch.device("cpu")})())
    recipe._run_evaluation(None, None, None)
    assert seen["precision"] == "bf16"
    with pytest.raises(ValueError, match="eval.precision"):
        load_run(REPO / "configs" / "retrieval_flickr.yaml", ["eval.precision=fp8"])


def _zero(stage: int) -> dict:
    return json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())


@pytest.mark.parametrize("value", ["int8", "float32", 16])
def test_invalid_communication_data_type_refused(value):
    cfg = _zero(0) if (REPO / "ds_configs" / "zero0.json").exists() else json.loads(
        (REPO / "ds_configs" / "zero0_cpu.json").read_text())
    cfg["communication_data_type"] = value
    with pytest.raises(ValueError, match="communication_data_type=.* is not one of fp32, fp16, bf16"):
        resolve_ds_config(cfg, PLAN)


def test_communication_data_type_passes_where_deepspeed_uses_it():
    cfg = json.loads((REPO / "ds_configs" / "zero0_cpu.json").read_text())   # no torch_autocast: it applies
    cfg.pop("torch_autocast", None)
    cfg["communication_data_type"] = "BF16"
    assert resolve_ds_config(cfg, PLAN)["communication_data_type"] == "BF16"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_communication_data_type_refused_where_torch_autocast_ignores_it(stage):
    cfg = _zero(stage)
    cfg["communication_data_type"] = "fp32"
    with pytest.raises(ValueError, match="lower_precision_safe_modules"):
        resolve_ds_config(cfg, PLAN)
    cfg.pop("communication_data_type")
    cfg["torch_autocast"]["lower_precision_safe_modules"] = []      # fp32 reductions everywhere: accepted
    resolve_ds_config(cfg, PLAN)
    cfg["torch_autocast"]["lower_precision_safe_modules"] = "torch.nn.Linear"
    with pytest.raises(ValueError, match="list of class paths"):
        resolve_ds_config(cfg, PLAN)
