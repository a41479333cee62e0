"""Tokenisation as the model expects it, and the built-in tiny vocabulary."""
import string

import pytest

from model.albef import text_settings_from_tokenizer
from pipeline.tokenize import REPO_ROOT, load_tokenizer, read_vocab, text_batch


def test_tiny_vocab_has_no_unknowns_for_letters_and_digits(tiny_tokenizer):
    vocab = read_vocab(REPO_ROOT / "configs" / "tiny_vocab.txt")
    assert list(vocab)[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for ch in string.ascii_lowercase + string.digits:
        assert ch in vocab and f"##{ch}" in vocab
    for word in ("red", "blue", "circle", "triangle", "left", "above", "three", "dog", "woman", "next", "to"):
        assert word in vocab
    assert len(vocab) > 300
    captions = ["qwxz zebra 42 kvlj", "a red circle next to 7 blue squares", string.ascii_lowercase + string.digits]
    ids, _ = text_batch(tiny_tokenizer, captions, 200)
    assert tiny_tokenizer.unk_token_id not in ids.tolist()[0] + ids.tolist()[1] + ids.tolist()[2]
    assert tiny_tokenizer.convert_ids_to_tokens(ids[1, 1:5].tolist()) == ["a", "red", "circle", "next"]


def test_text_settings_match_the_tiny_config(tiny_tokenizer, tiny_cfg):
    settings = text_settings_from_tokenizer(tiny_tokenizer)
    assert settings == {k: tiny_cfg["model"]["text"][k] for k in settings}


def test_text_batch_is_cls_then_tokens_without_sep_padded_to_longest(tiny_tokenizer):
    ids, mask = text_batch(tiny_tokenizer, ["a red dog", "two cats", ""], max_tokens=25)
    cls, pad, sep = tiny_tokenizer.cls_token_id, tiny_tokenizer.pad_token_id, tiny_tokenizer.sep_token_id
    assert ids.shape == mask.shape == (3, 4)
    assert (ids[:, 0] == cls).all() and sep not in ids.tolist()[0]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]]
    assert (ids[mask == 0] == pad).all()


def test_text_batch_truncates_to_max_tokens_in_all(tiny_tokenizer):
    ids, mask = text_batch(tiny_tokenizer, ["dog " * 40], max_tokens=25)
    assert ids.shape == (1, 25) and mask.all()
    with pytest.raises(ValueError, match="max_tokens=1"):
        text_batch(tiny_tokenizer, ["dog"], max_tokens=1)


def test_load_tokenizer_finds_repo_relative_paths_from_elsewhere(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert len(load_tokenizer("configs/tiny_vocab.txt")) == len(read_vocab(REPO_ROOT / "configs" / "tiny_vocab.txt"))
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        load_tokenizer("no-such-tokenizer")


def test_load_tokenizer_reads_a_saved_tokenizer_directory(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again.get_vocab() == tiny_tokenizer.get_vocab()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
        load_tokenizer(str(tmp_path / "empty"))
