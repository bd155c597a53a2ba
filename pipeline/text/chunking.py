"""Cutting a work into documents of at most `max_chunk_bytes` UTF-8 bytes: at paragraph
boundaries where possible, then at line boundaries, then anywhere on a character boundary.
Used by the corpus loader and by the embedded corpus's per-domain cap."""
from __future__ import annotations


def chunk_text(text: str, max_bytes: int) -> list[str]:
    """Split text into pieces of at most max_bytes UTF-8 bytes, at paragraph boundaries
    where possible, then at line boundaries, then anywhere (on a character boundary)."""
    if len(text.encode("utf-8")) <= max_bytes:
        return [text]
    pieces: list[str] = []
    for unit in _units(text, max_bytes):
        if pieces and len((pieces[-1] + unit).encode("utf-8")) <= max_bytes:
            pieces[-1] += unit
        else:
            pieces.append(unit)
    return pieces


def _units(text: str, max_bytes: int) -> list[str]:
    """Paragraphs (with their trailing blank lines); oversized ones cut into lines, then bytes."""
    out: list[str] = []
    for para in _split_keep(text, "\n\n"):
        if len(para.encode("utf-8")) <= max_bytes:
            out.append(para)
            continue
        for line in _split_keep(para, "\n"):
            data = line.encode("utf-8")
            while len(data) > max_bytes:
                cut = max_bytes
                while cut > 0 and (data[cut] & 0xC0) == 0x80:  # don't split a UTF-8 sequence
                    cut -= 1
                if cut == 0:  # one character longer than max_bytes: keep it whole
                    cut = 1
                    while cut < len(data) and (data[cut] & 0xC0) == 0x80:
                        cut += 1
                out.append(data[:cut].decode("utf-8"))
                data = data[cut:]
            out.append(data.decode("utf-8"))
    return out


def _split_keep(text: str, sep: str) -> list[str]:
    parts = text.split(sep)
    return [p + sep for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
