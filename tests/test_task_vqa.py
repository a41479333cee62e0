"""VQA units: decoder loss and weighting, causal mask, answer ranking, weight mapping, data, metrics.

Everything runs in one process on the tiny model (demo/vqa_scenes.py data).
"""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from model.albef import ALBEF, text_settings_from_tokenizer
from model.engine.config import load_config
from model.tasks.vqa import padded_share
from model.tasks.vqa_metrics import (check_complete, merge_results, normalize_prediction, question_accuracy,
                                     vqa_accuracy)
from model.vqa import ALBEFVQA, rank_answers
from model.weights.released import CheckpointMismatchError, export_albef_state_dict
from model.weights.vqa import export_vqa_state_dict, load_vqa_state_dict
from pipeline.tokenize import load_tokenizer
from pipeline.transforms import ImageTransform
from pipeline.vqa_data import (VQAEvalDataset, VQATrainCollate, VQATrainDataset, answer_batch, answer_weights,
                               pre_question, read_answer_list)
from tests.fixtures.model import REPO_ROOT
from demo.vqa_scenes import write_vqa_dataset


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("configs/tiny_vocab.txt")


@pytest.fixture(scope="module")
def vqa_cfg(tokenizer) -> dict:
    """The tiny `model` section of configs/vqa_tiny.yaml with dropout off."""
    cfg = copy.deepcopy(load_config(REPO_ROOT / "configs" / "vqa_tiny.yaml")["model"])
    cfg["text"].update(text_settings_from_tokenizer(tokenizer), hidden_dropout=0.0, attention_dropout=0.0)
    return cfg


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory):
    return write_vqa_dataset(tmp_path_factory.mktemp("vqa_data"), n_train_images=8, n_val_scenes=3,
                             images_per_val_scene=1)


@pytest.fixture
def model(vqa_cfg, torch_single_thread) -> ALBEFVQA:
    torch.manual_seed(0)
    return ALBEFVQA(vqa_cfg).eval()


def _batch(tokenizer, vqa_data, n: int = 3) -> dict:
    roots = {"vqa": str(vqa_data.root), "vg": str(vqa_data.root)}
    dataset = VQATrainDataset([vqa_data.train], roots, ImageTransform(32, train=False), vg_weight=0.5)
    return VQATrainCollate(tokenizer, 25)([dataset[i] for i in range(n)])


# ---------------------------------------------------------------- loss

def test_loss_and_answer_weighting_equal_an_independent_recomputation(model, tokenizer, vqa_data):
    """Loss = sum_a w_a [(1-alpha) sum_t CE_t + alpha sum_t H(q_t, p_t)] / B, recomputed one answer at a
    time without padding, with the teacher (momentum copies) made different from the student."""
    with torch.no_grad():
        for p in model.text_decoder_m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch(tokenizer, vqa_data, n=4)
    alpha = 0.3
    keys = ("image", "question_ids", "question_mask", "answer_ids", "answer_mask", "answer_weights",
            "answer_counts")
    loss = model(*(batch[k] for k in keys), alpha=alpha)["loss_vqa"]

    expected, a = 0.0, 0
    for b, count in enumerate(batch["answer_counts"].tolist()):
        n_q = int(batch["question_mask"][b].sum())
        q_ids, q_mask = batch["question_ids"][b:b + 1, :n_q], batch["question_mask"][b:b + 1, :n_q]
        states = model.encode_question(batch["image"][b:b + 1], q_ids, q_mask)
        states_m = model.encode_question(batch["image"][b:b + 1], q_ids, q_mask, momentum=True)
        for _ in range(count):
            n_a = int(batch["answer_mask"][a].sum())
            ids = batch["answer_ids"][a:a + 1, :n_a]
            ones = torch.ones_like(ids)
            logits = model.text_decoder(ids, ones, states, q_mask)[0]          # [n_a, V]
            teacher = F.softmax(model.text_decoder_m(ids, ones, states_m, q_mask)[0], dim=-1)
            ce = distill = 0.0
            for t in range(n_a - 1):                                           # position t predicts t+1
                log_p = F.log_softmax(logits[t], dim=-1)
                ce += -log_p[ids[0, t + 1]]
                distill += -(teacher[t] * log_p).sum()
            expected += batch["answer_weights"][a] * ((1 - alpha) * ce + alpha * distill)
            a += 1
    expected /= len(batch["answer_counts"])
    assert a == len(batch["answer_ids"])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_grad_checkpointing_gives_the_same_loss_and_gradients(vqa_cfg, tokenizer, vqa_data, torch_single_thread):
    batch = _batch(tokenizer, vqa_data, n=2)
    keys = ("image", "question_ids", "question_mask", "answer_ids", "answer_mask", "answer_weights",
            "answer_counts")
    results = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = ALBEFVQA({**vqa_cfg, "grad_checkpointing": enabled}).train()
        loss = model(*(batch[k] for k in keys), alpha=0.4)["loss_vqa"]
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.trainable_parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_answer_weights_follow_the_reference(tokenizer, vqa_data):
    assert answer_weights(["two"] * 6 + ["2"] * 3 + ["three"]) == (["two", "2", "three"], [0.6, 0.3, 0.1])
    roots = {"vqa": str(vqa_data.root), "vg": str(vqa_data.root)}
    dataset = VQATrainDataset([vqa_data.train], roots, ImageTransform(32, train=False), vg_weight=0.25)
    entries = json.loads(vqa_data.train.read_text())
    vg = next(i for i, e in enumerate(entries) if e["dataset"] == "vg")
    assert dataset[vg]["answers"] == [entries[vg]["answer"]] and dataset[vg]["weights"] == [0.25]
    for i, e in enumerate(entries):
        if e["dataset"] == "vqa":
            assert math.isclose(sum(dataset[i]["weights"]), 1.0)
    ids, mask = answer_batch(tokenizer, ["red", "circle square"])
    assert tokenizer.convert_ids_to_tokens(ids[1].tolist()) == ["[CLS]", "circle", "square", "[SEP]"]
    assert tokenizer.convert_ids_to_tokens(ids[0].tolist()) == ["[CLS]", "red", "[SEP]", "[PAD]"]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_decoder_self_attention_is_causal(model, tokenizer):
    """Changing later answer tokens never changes earlier positions; the attention weights on
    later positions are exactly zero."""
    states = torch.randn(2, 5, model.settings.text.hidden_size)
    states_mask = torch.ones(2, 5, dtype=torch.long)
    ids = torch.randint(10, 300, (2, 6))
    ids[:, 0] = tokenizer.cls_token_id
    changed = ids.clone()
    changed[:, 3:] = torch.randint(10, 300, (2, 3))
    ones = torch.ones_like(ids)
    with torch.no_grad():
        a = model.text_decoder(ids, ones, states, states_mask)
        b = model.text_decoder(changed, ones, states, states_mask)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])
    attn = model.text_decoder.layers[0].self_attn
    attn.keep_attention = True
    with torch.no_grad():
        explicit = model.text_decoder(ids, ones, states, states_mask)
    torch.testing.assert_close(explicit, a, rtol=1e-5, atol=1e-5)   # SDPA and the explicit softmax agree
    later = torch.ones(6, 6, dtype=torch.bool).triu(1)
    assert (attn.attention_probs[..., later] == 0).all() and (attn.attention_probs[..., ~later] > 0).all()


# ---------------------------------------------------------------- ranking

class TableDecoder:
    """A hand-built decoder: next-token probabilities looked up by prefix (question 0 or 1 via the
    states), all other tokens sharing the leftover mass. Ids: CLS=1, SEP=2, x=5, y=6, z=7, w=8."""
    V = 10

    def __init__(self, tables):
        self.tables = tables   # per question: {prefix tuple (after CLS): {token: prob}}

    def __call__(self, ids, mask, states, states_mask):
        logits = torch.empty(*ids.shape, self.V)
        for n in range(ids.shape[0]):
            table = self.tables[int(states[n, 0, 0])]
            for t in range(ids.shape[1]):
                probs = table.get(tuple(ids[n, 1:t + 1].tolist()), {})
                rest = (1.0 - sum(probs.values())) / (self.V - len(probs))
                logits[n, t] = torch.tensor([probs.get(v, rest) for v in range(self.V)]).log()
        return logits


ANSWERS = {"xy": [1, 5, 6, 2], "z": [1, 7, 2, 0], "w": [1, 8, 2, 0]}
TABLES = [
    # q0: p(xy) = .5*.4*.9 = .18, p(z) = .3*.9 = .27: likelihood picks z; reference (first token twice):
    # .5*.18 = .09 > .3*.27 = .081 picks xy
    {(): {5: .5, 7: .3, 8: .1}, (5,): {6: .4}, (5, 6): {2: .9}, (7,): {2: .9}, (8,): {2: .9}},
    # q1: w is best under both scores
    {(): {5: .1, 7: .2, 8: .6}, (5,): {6: .5}, (5, 6): {2: .9}, (7,): {2: .9}, (8,): {2: .9}},
]


def _by_formula(question: int, double_first: bool) -> str:
    """The answer chosen by the scoring formula, from the tables (no tensors)."""
    table = TABLES[question]
    scores = {}
    for name, ids in ANSWERS.items():
        tokens = [t for t in ids[1:] if t != 0]
        p, prefix = 1.0, ()
        for token in tokens:
            p *= table[prefix][token]
            prefix += (token,)
        scores[name] = p * (table[()][tokens[0]] if double_first else 1.0)
    return max(scores, key=scores.get)


@pytest.mark.parametrize("k", [1, 2, 3, 128])
def test_ranking_picks_what_the_formulas_pick(k):
    names = list(ANSWERS)
    ids = torch.tensor([ANSWERS[n] for n in names])
    mask = (ids != 0).long()
    states = torch.tensor([0.0, 1.0]).view(2, 1, 1).expand(2, 3, 4).contiguous()
    states_mask = torch.ones(2, 3, dtype=torch.long)
    decode = TableDecoder(TABLES)
    for score, double in (("reference", True), ("likelihood", False)):
        best, top, scores = rank_answers(decode, states, states_mask, ids, mask, k, pad_token_id=0, score=score)
        assert top.shape == (2, min(k, 3))   # k above the list length is clamped
        for q in range(2):
            if k == 1:   # only the most probable first token survives
                assert names[best[q]] == max(names, key=lambda n: TABLES[q][()][ANSWERS[n][1]])
            else:
                assert names[best[q]] == _by_formula(q, double), (score, q, k)
    # the two scores disagree on question 0, so the option matters
    assert _by_formula(0, True) == "xy" and _by_formula(0, False) == "z"


def test_ranking_with_the_model_equals_scoring_every_answer_alone(model, tokenizer):
    """Batched top-k ranking (k above the list length) = each answer teacher-forced on its own, unpadded."""
    answers = ["red", "green", "blue square", "circle", "yellow triangle", "white"]
    ids, mask = answer_batch(tokenizer, answers)
    states = torch.randn(3, 4, model.settings.text.hidden_size)
    states_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    with torch.no_grad():
        for p in model.text_decoder.lm_head.parameters():   # sharpen the random decoder's distributions
            p.mul_(20.0)
        for score in ("reference", "likelihood"):
            best, _, _ = rank_answers(model.text_decoder, states, states_mask, ids, mask, 128, 0, score)
            for q in range(3):
                n = int(states_mask[q].sum())            # the question's padding dropped
                s_q, m_q = states[q:q + 1, :n], states_mask[q:q + 1, :n]
                totals = []
                for a in range(len(answers)):
                    a_ids = ids[a:a + 1, :int(mask[a].sum())]
                    log_p = F.log_softmax(model.text_decoder(a_ids, torch.ones_like(a_ids), s_q, m_q)[0], -1)
                    ll = sum(log_p[t, a_ids[0, t + 1]] for t in range(a_ids.shape[1] - 1))
                    totals.append(ll + (log_p[0, a_ids[0, 1]] if score == "reference" else 0.0))
                assert int(best[q]) == int(torch.stack(totals).argmax()), (score, q)


# ---------------------------------------------------------------- weights

def test_pretraining_checkpoint_maps_fusion_layers_into_the_decoder(vqa_cfg, torch_single_thread):
    torch.manual_seed(1)
    source = ALBEF(vqa_cfg)
    sd = export_albef_state_dict(source)
    model = ALBEFVQA(vqa_cfg)
    report = load_vqa_state_dict(model, {"model": sd})
    for prefix in ("", "_m"):
        enc, dec = getattr(source, f"text_encoder{prefix}"), getattr(model, f"text_decoder{prefix}")
        for j, layer in enumerate(enc.fusion_layers):
            torch.testing.assert_close(dec.layers[j].state_dict(), layer.state_dict(), rtol=0, atol=0)
        torch.testing.assert_close(dec.embeddings.state_dict(), enc.embeddings.state_dict(), rtol=0, atol=0)
        torch.testing.assert_close(dec.lm_head.state_dict(), enc.mlm_head.state_dict(), rtol=0, atol=0)
        encoder = {k: v for k, v in enc.state_dict().items() if not k.startswith("mlm_head.")}
        torch.testing.assert_close(getattr(model, f"text_encoder{prefix}").state_dict(), encoder, rtol=0, atol=0)
    # the decoder's LM head stays tied to its own word embeddings, not to the encoder's
    assert model.text_decoder.lm_head.decoder.weight is model.text_decoder.embeddings.word_embeddings.weight
    decoder_words = model.text_decoder.embeddings.word_embeddings.weight
    assert decoder_words is not model.text_encoder.embeddings.word_embeddings.weight
    # every checkpoint key is loaded or explained; nothing of the model is missing
    assert not report.missing
    unexpected = set(report.unexpected)
    assert unexpected == {k for k in sd if k.split(".")[0] in {"vision_proj", "text_proj", "vision_proj_m",
                                                               "text_proj_m", "itm_head", "temp", "image_queue",
                                                               "text_queue", "queue_ptr"}
                          or k.endswith("position_ids")}
    assert all(report.unexpected.values())


def test_vqa_layout_round_trip_and_refusals(vqa_cfg, torch_single_thread):
    torch.manual_seed(2)
    model = ALBEFVQA(vqa_cfg)
    exported = export_vqa_state_dict(model)
    assert any(k.startswith("text_decoder.bert.encoder.layer.0.crossattention.") for k in exported)
    assert any(k.startswith("text_decoder.cls.predictions.") for k in exported)
    again = ALBEFVQA(vqa_cfg)
    report = load_vqa_state_dict(again, exported)
    assert "VQA layout" in report.source
    torch.testing.assert_close(again.state_dict(), model.state_dict(), rtol=0, atol=0)

    with torch.no_grad():
        for p in again.text_decoder_m.parameters():
            p.zero_()
    online_only = {k: v for k, v in exported.items() if "_m." not in k}
    report = load_vqa_state_dict(again, online_only)
    assert report.missing and all("copied from the online" in r for r in report.missing.values())
    torch.testing.assert_close(again.text_decoder_m.state_dict(), model.text_decoder.state_dict(), rtol=0, atol=0)

    # refusals happen before anything is loaded
    pretrain = export_albef_state_dict(ALBEF(vqa_cfg))
    retrieval_like = {k: v for k, v in pretrain.items() if ".cls." not in k}
    with pytest.raises(CheckpointMismatchError, match="no MLM head"):
        load_vqa_state_dict(again, retrieval_like)
    with pytest.raises(CheckpointMismatchError, match="unexpected.*mystery"):
        load_vqa_state_dict(again, {**pretrain, "mystery.weight": torch.zeros(1)})
    wide = copy.deepcopy(vqa_cfg)
    wide["vision"].update(width=32, num_heads=2)   # fusion cross-attention reads 32-wide image tokens
    with pytest.raises(CheckpointMismatchError, match="must be equal"):
        load_vqa_state_dict(again, export_albef_state_dict(ALBEF(wide)))


# ---------------------------------------------------------------- data

def test_pre_question_is_the_reference_cleaning():
    assert pre_question("What's  the man-made thing/object?  ", 30) == "whats  the man made thing object"
    assert pre_question("a b c d", 2) == "a b"


def test_bad_records_are_named(tmp_path, vqa_data):
    roots = {"vqa": str(vqa_data.root), "vg": None}
    transform = ImageTransform(32, train=False)

    def write(name, data):
        path = tmp_path / name
        path.write_text(json.dumps(data))
        return path

    missing = write("missing.json", [{"dataset": "vqa", "image": "nope.png", "question": "q?", "question_id": 7}])
    with pytest.raises(FileNotFoundError, match=r"missing.json entry 0 \(question_id 7\): image .*nope.png"):
        VQAEvalDataset(missing, roots, transform)
    vg = write("vg.json", [{"dataset": "vg", "image": "images/train_0000.png", "question": "q?", "answer": "red"}])
    with pytest.raises(ValueError, match="neither data.vg_root nor data.vg_shards is set"):
        VQATrainDataset([vg], roots, transform, vg_weight=0.5)
    no_answer = write("none.json", [{"dataset": "vqa", "image": "images/train_0000.png", "question": "q?",
                                     "question_id": 3, "answer": []}])
    with pytest.raises(ValueError, match=r"none.json entry 0 \(question_id 3\): 'answer' must be"):
        VQATrainDataset([no_answer], roots, transform, vg_weight=0.5)
    twice = write("twice.json", [{"dataset": "vqa", "image": "images/train_0000.png", "question": "q?",
                                  "question_id": 3}] * 2)
    with pytest.raises(ValueError, match="question_id 3 repeats entry 0"):
        VQAEvalDataset(twice, roots, transform)
    with pytest.raises(ValueError, match="is empty"):
        read_answer_list(write("empty.json", []))
    with pytest.raises(ValueError, match="'red' appears twice"):
        read_answer_list(write("dup.json", ["red", "blue", "red"]))


# ---------------------------------------------------------------- metrics and result files

def test_vqa_accuracy_is_the_official_leave_one_out():
    humans = ["2"] * 3 + ["3"] * 7
    # 3 matching answers: 7 subsets keep all three (1.0), 3 subsets keep two (2/3)
    assert math.isclose(question_accuracy("two", humans), (7 * 1.0 + 3 * 2 / 3) / 10)
    assert question_accuracy("3", humans) == 1.0 and question_accuracy("4", humans) == 0.0
    assert math.isclose(question_accuracy("yes", ["yes"] + ["no"] * 9), 0.9 * (1 / 3))
    assert normalize_prediction("The Dog.") == "dog" and normalize_prediction("dont") == "don't"
    acc = vqa_accuracy({1: "3", 2: "no"}, {1: humans, 2: ["yes"] * 10})
    assert acc == {"acc": 50.0, "questions": 2}
    with pytest.raises(RuntimeError, match="1 questions unanswered"):
        vqa_accuracy({1: "3"}, {1: humans, 2: ["yes"] * 10})


def test_padded_shares_and_merge_cover_every_question_once():
    for n, world in ((7, 2), (5, 3), (1, 4), (8, 2)):
        shares = [padded_share(n, r, world) for r in range(world)]
        assert len({len(s) for s in shares}) == 1 and set().union(*shares) == set(range(n))
        rows = [[{"question_id": 100 + i, "answer": f"a{i}"} for i in s] for s in shares]
        merged = merge_results(rows)
        assert sorted(r["question_id"] for r in merged) == [100 + i for i in range(n)]
        check_complete([r["question_id"] for r in merged], range(100, 100 + n))
    with pytest.raises(RuntimeError, match="answered twice, differently"):
        merge_results([[{"question_id": 1, "answer": "a"}], [{"question_id": 1, "answer": "b"}]])
