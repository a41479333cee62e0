"""BERT WordPiece tokenisation as ALBEF feeds it: `[CLS] tokens`, no trailing `[SEP]`.

`load_tokenizer` accepts a hub name (only where the local Hugging Face cache
has it: nothing is downloaded in tests), a local tokenizer directory, or a bare
`vocab.txt` (e.g. the project's built-in `configs/tiny_vocab.txt`). Relative
paths that do not exist from the working directory are tried from the
repository root, so configs can name `configs/tiny_vocab.txt`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from transformers import BertTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]


def _resolve(name_or_path: str) -> Path | None:
    path = Path(name_or_path)
    for candidate in (path, REPO_ROOT / path) if not path.is_absolute() else (path,):
        if candidate.exists():
            return candidate
    return None


def read_vocab(path: Path) -> dict[str, int]:
    """vocab.txt (one token a line, id = line number) -> {token: id}; duplicates are refused."""
    vocab: dict[str, int] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        token = line.rstrip("\r")
        if token in vocab:
            raise ValueError(f"{path}: token {token!r} on line {line_no + 1} repeats line {vocab[token] + 1}")
        vocab[token] = line_no
    return vocab


def _hub_vocab_file(name: str) -> Path:
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(name, "vocab.txt"))
    except Exception as exc:
        raise FileNotFoundError(f"tokenizer {name!r}: not a vocab file, not a tokenizer directory, and the "
                                f"Hugging Face hub or its cache has no vocab.txt for it ({exc})") from exc


def _from_vocab(vocab_file: Path) -> BertTokenizerFast:
    config_file = vocab_file.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return BertTokenizerFast(vocab=read_vocab(vocab_file), do_lower_case=config.get("do_lower_case", True))


def load_tokenizer(name_or_path: str) -> BertTokenizerFast:
    """BERT WordPiece tokenizer from a vocab file, a directory or a hub name.

    Files are located explicitly: transformers' `from_pretrained` silently
    falls back to a 5-token vocabulary when it finds nothing. Lower casing as
    the tokenizer_config.json beside a vocab.txt says, else on (uncased BERT).
    """
    path = _resolve(name_or_path)
    if path is None:
        return _from_vocab(_hub_vocab_file(name_or_path))
    if path.is_file():
        return _from_vocab(path)
    if (path / "tokenizer.json").is_file():
        return BertTokenizerFast.from_pretrained(str(path))
    if (path / "vocab.txt").is_file():
        return _from_vocab(path / "vocab.txt")
    raise FileNotFoundError(f"tokenizer directory {path} has neither tokenizer.json nor vocab.txt")


def text_batch(tokenizer, captions: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (input_ids, attention_mask), long [B, L]: `[CLS] w1 .. wn` truncated to
    `max_tokens` tokens in all, padded with [PAD] to the longest in the batch."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens}: need room for [CLS] and at least one token")
    pieces = tokenizer(list(captions), add_special_tokens=False, truncation=True,
                       max_length=max_tokens - 1)["input_ids"]
    length = 1 + max((len(p) for p in pieces), default=0)
    input_ids = torch.full((len(pieces), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pieces), length), dtype=torch.long)
    for row, ids in enumerate(pieces):
        input_ids[row, 0] = tokenizer.cls_token_id
        input_ids[row, 1:1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :1 + len(ids)] = 1
    return input_ids, attention_mask
