"""Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, specials follow.

Byte-level tokens let any expert be composed with any central model; the fingerprint is
stored with every checkpoint so composition can refuse mixed tokenizers. `encode_bytes` and
`encode_texts` are the one way text becomes token ids; `VOCAB_SIZE` sizes every model's embedding.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")


class ByteTokenizer:
    """UTF-8 bytes plus a few special tokens."""

    kind = "byte"

    def __init__(self, specials: tuple[str, ...] = SPECIALS):
        self.specials = tuple(specials)
        self.special_ids = {name: 256 + i for i, name in enumerate(self.specials)}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.specials)

    @property
    def bos_id(self) -> int:
        return self.special_ids["<|bos|>"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["<|eos|>"]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Bytes back to text; specials are dropped, broken UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "specials": list(self.specials)}

    @property
    def fingerprint(self) -> str:
        """sha256 of the tokenizer's canonical description (16 hex digits)."""
        blob = json.dumps(self.spec(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


TOKENIZER = ByteTokenizer()
VOCAB_SIZE = TOKENIZER.vocab_size  # 259: the 256 bytes and three specials
EOS_ID = TOKENIZER.eos_id


def encode_bytes(text: str | bytes) -> np.ndarray:
    """(n_bytes,) uint8 token ids of one text: its UTF-8 bytes, no specials."""
    return np.frombuffer(text if isinstance(text, bytes) else text.encode("utf-8"), dtype=np.uint8)


def encode_texts(texts: list[str], eos_id: int | None = None) -> np.ndarray:
    """Byte tokens of the texts, concatenated (each followed by eos_id when given), as uint16."""
    parts = []
    for text in texts:
        parts.append(encode_bytes(text).astype(np.uint16))
        if eos_id is not None:
            parts.append(np.array([eos_id], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
