"""The floor a language model must clear: bits per byte of the standard library's
compressors at their strongest settings on the same held-out documents.

`gzip`, `bz2`, `xz` compress each document alone (what a model that sees one document
at a time is up against); `gzip_domain`, `bz2_domain`, `xz_domain` compress each domain's
documents together (a compressor that may reuse what it saw in the domain's other
documents, as a model reuses what it learnt in training).
"""
from __future__ import annotations

import bz2
import gzip
import lzma
from typing import Callable

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
    "bz2": lambda data: bz2.compress(data, compresslevel=9),
    "xz": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME),
}
SYSTEMS = tuple(COMPRESSORS) + tuple(f"{name}_domain" for name in COMPRESSORS)


def compressor_bpb(domains: list[str], docs: list[bytes]) -> dict[str, dict[str, float]]:
    """{system: {domain: bits per byte, 'all': bits per byte}} of every compressor, alone and by domain."""
    names = sorted(set(domains))
    total_bytes = {dom: sum(len(d) for d, dd in zip(docs, domains) if dd == dom) for dom in names}
    out = {}
    for name, compress in COMPRESSORS.items():
        alone = {dom: 0 for dom in names}
        for doc, dom in zip(docs, domains):
            alone[dom] += 8 * len(compress(doc))
        together = {dom: 8 * len(compress(b"".join(d for d, dd in zip(docs, domains) if dd == dom)))
                    for dom in names}
        for system, bits in ((name, alone), (f"{name}_domain", together)):
            out[system] = {dom: bits[dom] / total_bytes[dom] for dom in names}
            out[system]["all"] = sum(bits.values()) / sum(total_bytes.values())
    return out
