"""Bad annotation files: per-item reports, the rest evaluated, failed queries counted as misses.

The evaluation here runs the real ranking code with an oracle model whose
features are known exactly, so the expected ranks are known exactly too.
"""
import json

import pytest
import torch
from PIL import Image
from torch import nn

from model.tasks.retrieval_eval import evaluate, evaluate_itc
from model.tasks.retrieval_metrics import REASON_QUERY, REASON_TARGETS
from pipeline import annotations as ann
from pipeline.tokenize import load_tokenizer
from pipeline.transforms import ImageTransform

N_WORDS = 12
RES = 8


def red_value(i: int) -> int:
    return 10 * i + 5


def write_image(path, i):
    Image.new("RGB", (12, 12), (red_value(i), 0, 0)).save(path)


class OracleModel(nn.Module):
    """Image i is a flat image of red value 10*i+5; caption word `w{i}` describes it.

    ITC features are deliberately off by one (the right image comes second by
    ITC similarity); the ITM logit is exact (1 for the right pair, 0 otherwise),
    so only ITM re-ranking with k >= 2 retrieves everything first.
    """

    def __init__(self, word0_id: int):
        super().__init__()
        self.word0_id = word0_id
        self.dummy = nn.Parameter(torch.zeros(1))

    def _image_index(self, images):
        mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
        std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
        red = ((images * std + mean) * 255).round()[:, 0, 0, 0]
        return ((red - 5) / 10).round().long()

    def encode_image(self, images):
        i = self._image_index(images)
        exact = nn.functional.one_hot(i, N_WORDS).float()
        shifted = nn.functional.one_hot((i + 1) % N_WORDS, N_WORDS).float()
        itc = nn.functional.normalize(exact + 1.2 * shifted, dim=-1)
        return exact[:, None, :], itc

    def encode_text(self, input_ids, attention_mask):
        first_word = (input_ids >= self.word0_id).long().argmax(dim=1)
        w = (input_ids.gather(1, first_word[:, None])[:, 0] - self.word0_id).clamp(0, N_WORDS - 1)
        exact = nn.functional.one_hot(w, N_WORDS).float()
        return exact[:, None, :].expand(-1, input_ids.shape[1], -1), exact

    def itm_logits(self, image_tokens, text_tokens, attention_mask):
        match = (image_tokens[:, 0] * text_tokens[:, 0]).sum(-1)
        return torch.stack([-match, match], dim=1)


@pytest.fixture
def tokenizer(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "again", "photo"]
                               + [f"w{i}" for i in range(N_WORDS)]) + "\n")
    return load_tokenizer(str(vocab))


@pytest.fixture
def bad_eval_file(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    for i in range(5):
        if i != 3:                                   # entry 3's image is missing
            write_image(root / f"{i}.png", i)
    (root / "6.png").write_bytes(b"\xff\xd8 not really a jpeg")  # entry 6 cannot be decoded
    entries = [
        {"image": "0.png", "caption": ["w0", "photo w0"]},
        {"image": "1.png", "caption": ["w1"]},
        {"image": "2.png", "caption": ["w2"]},
        {"image": "3.png", "caption": ["w3"]},             # missing file
        {"image": "4.png", "caption": ["w4", ",.!?"]},       # second caption empty after cleaning
        {"image": "2.png", "caption": ["again w2"]},        # duplicate of entry 2
        {"image": "6.png", "caption": ["w6"]},              # undecodable
        {"caption": ["w7"]},                                # malformed: no image
    ]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(entries))
    return path, root


def test_eval_dataset_reports_each_bad_item(bad_eval_file):
    path, root = bad_eval_file
    ds = ann.RetrievalEvalDataset(path, root, ImageTransform(RES, train=False))
    reasons = {(p["entry"], p["reason"]) for p in ds.problems}
    assert reasons == {(3, ann.MISSING_IMAGE), (4, ann.EMPTY_CAPTION), (5, ann.DUPLICATE_IMAGE),
                       (7, ann.MALFORMED)}
    # One slot per entry; every caption kept in place; duplicate's caption belongs to entry 2.
    assert len(ds) == 8 and len(ds.texts) == 10
    assert ds.img2txt[2] == [3, 7] and ds.img2txt[5] == [] and ds.txt2img[7] == 2
    assert ds.image_ok == [True, True, True, False, True, False, True, False]
    assert ds.text_ok.count(False) == 1 and ds.texts[6] == ""
    # The undecodable image only shows up when loaded.
    item = ds[6]
    assert item["image"] is None and "Error" in item["error"]


@pytest.mark.timeout(60)
def test_bad_items_are_reported_rest_evaluated_failed_queries_missed(bad_eval_file, tokenizer):
    path, root = bad_eval_file
    ds = ann.RetrievalEvalDataset(path, root, ImageTransform(RES, train=False))
    model = OracleModel(tokenizer.convert_tokens_to_ids("w0"))
    result, timings, _ = evaluate(model, ds, tokenizer, k_test=4, max_tokens=8,
                               image_batch_size=3, text_batch_size=4)
    assert (6, ann.UNREADABLE_IMAGE) in {(p["entry"], p["reason"]) for p in ds.problems}
    # Usable queries are all retrieved first; each unusable one is a miss with a reason.
    assert result.ranks_i2t == [0, 0, 0, None, 0, None, None, None]
    assert result.unscored_images == {3: REASON_QUERY, 5: REASON_QUERY, 6: REASON_QUERY, 7: REASON_QUERY}
    # texts: 0,1 (img0), 2 (img1), 3 (img2), 4 (img3 missing), 5,6 (img4; 6 empty), 7 (dup -> img2),
    #        8 (img6 undecodable), 9 (img7 malformed)
    assert result.ranks_t2i == [0, 0, 0, 0, None, 0, None, 0, None, None]
    assert result.unscored_texts == {4: REASON_TARGETS, 6: REASON_QUERY, 8: REASON_TARGETS, 9: REASON_TARGETS}
    m = result.metrics
    assert m["txt_r1"] == pytest.approx(100 * 4 / 8) and m["img_r1"] == pytest.approx(100 * 6 / 10)
    assert set(timings) == {"features_s", "rerank_s", "metrics_s"}


def test_itm_reranking_fixes_what_itc_ranks_second(tmp_path, tokenizer):
    root = tmp_path
    entries = []
    for i in range(N_WORDS):
        write_image(root / f"{i}.png", i)
        entries.append({"image": f"{i}.png", "caption": [f"w{i}"]})
    (root / "t.json").write_text(json.dumps(entries))
    ds = ann.RetrievalEvalDataset(root / "t.json", root, ImageTransform(RES, train=False))
    model = OracleModel(tokenizer.convert_tokens_to_ids("w0"))
    itc = evaluate_itc(model, ds, tokenizer, max_tokens=8)
    assert itc["txt_r1"] == 0.0 and itc["txt_r5"] == 100.0 and itc["img_r1"] == 0.0
    full, _, _ = evaluate(model, ds, tokenizer, k_test=2, max_tokens=8)
    assert full.metrics["txt_r1"] == 100.0 and full.metrics["img_r1"] == 100.0
    only_top1, _, _ = evaluate(model, ds, tokenizer, k_test=1, max_tokens=8)
    assert only_top1.metrics["txt_r1"] == 0.0   # the right one was never re-scored


def test_train_dataset_reports_and_keeps_batches_full(tmp_path, tokenizer):
    root = tmp_path
    for i in range(4):
        write_image(root / f"{i}.png", i)
    (root / "bad.png").write_bytes(b"garbage")
    entries = [
        {"image": "0.png", "caption": "w0", "image_id": 10},
        {"image": "0.png", "caption": "photo w0", "image_id": 10},
        {"image": "1.png", "caption": "w1", "image_id": 11},
        {"image": "9.png", "caption": "w9", "image_id": 19},          # missing
        {"image": "2.png", "caption": "!!", "image_id": 12},          # empty caption
        {"image": "3.png", "caption": "w3", "image_id": 11},          # id 11 already names 1.png
        {"image": "2.png", "caption": "w2", "image_id": 12},
        {"image": "2.png", "caption": "again w2", "image_id": 13},    # 2.png under a second id
        {"image": "bad.png", "caption": "w5", "image_id": 15},        # undecodable
        {"image": "0.png", "caption": "w0"},                           # malformed: no image_id
    ]
    (root / "train.json").write_text(json.dumps(entries))
    ds = ann.RetrievalTrainDataset(root / "train.json", root, ImageTransform(RES, train=True))
    reasons = [(p["entry"], p["reason"]) for p in ds.problems]
    assert sorted(reasons) == sorted([(3, ann.MISSING_IMAGE), (4, ann.EMPTY_CAPTION), (5, ann.ID_CONFLICT),
                                      (7, ann.IMAGE_TWO_IDS), (9, ann.MALFORMED)])
    assert len(ds) == 7 and ds.n_images == 5
    idx = [e[2] for e in ds.entries]
    assert idx[0] == idx[1]                 # two captions of one image share idx
    assert idx[2] != idx[3]                 # one id, two files: kept apart
    assert idx[4] == idx[5]                 # one file, two ids: one image
    # The undecodable image is replaced by the next entry and reported with the item.
    bad = [n for n, e in enumerate(ds.entries) if e[0].endswith("bad.png")][0]
    item = ds[bad]
    assert item["index"] == (bad + 1) % len(ds)
    assert item["load_failures"][0]["reason"] == ann.UNREADABLE_IMAGE
    collate = ann.TrainCollate(tokenizer, max_tokens=8)
    batch = collate([ds[0], item])
    assert batch["image"].shape == (2, 3, RES, RES) and batch["idx"].tolist()[0] == idx[0]
    assert len(batch["load_failures"]) == 1
    # Same seed, epoch and index -> the same augmentation, whichever process loads it.
    a, b = ds[0]["image"], ds[0]["image"]
    assert torch.equal(a, b)


def test_nothing_usable_is_a_clear_error(tmp_path, tokenizer):
    write_image(tmp_path / "0.png", 0)
    (tmp_path / "t.json").write_text(json.dumps([{"image": "0.png", "caption": ["?!", ""]}]))
    ds = ann.RetrievalEvalDataset(tmp_path / "t.json", tmp_path, ImageTransform(RES, train=False))
    model = OracleModel(tokenizer.convert_tokens_to_ids("w0"))
    with pytest.raises(ValueError, match="no usable caption in .*t.json"):
        evaluate_itc(model, ds, tokenizer, max_tokens=8)
    (tmp_path / "u.json").write_text(json.dumps([{"image": "gone.png", "caption": ["w1"]}]))
    ds = ann.RetrievalEvalDataset(tmp_path / "u.json", tmp_path, ImageTransform(RES, train=False))
    with pytest.raises(ValueError, match="no image of .*u.json could be loaded"):
        evaluate_itc(model, ds, tokenizer, max_tokens=8)


def test_unreadable_annotation_file_fails_with_its_name(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="x.json is not valid JSON"):
        ann.RetrievalEvalDataset(bad, tmp_path, ImageTransform(RES, train=False))
    bad.write_text(json.dumps({"image": "a"}))
    with pytest.raises(ValueError, match="must hold a JSON list"):
        ann.RetrievalEvalDataset(bad, tmp_path, ImageTransform(RES, train=False))
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        ann.RetrievalTrainDataset(tmp_path / "none.json", tmp_path, ImageTransform(RES, train=False))
