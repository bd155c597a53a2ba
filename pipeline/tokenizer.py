"""Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, specials follow.

Byte-level tokens let any expert be composed with any central model; the fingerprint is
stored with every checkpoint so composition can refuse mixed tokenizers.
"""
from __future__ import annotations

import hashlib
import json

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
