"""Token files read by blocks: ranged reads, each block checked once, a bounded cache.

A token file is a .npy array of uint16 tokens. Beside it lies its block index,
`<file>.blocks.json`: the sha256 of every `block_bytes` of the file (the .npy header is in
the first block) and of the whole file. The registry pins the index's own sha256 (tag
`moie.sha256.tokens.<split>.blocks`), so a driver checks a token file by reading its index
(64 hex digits a MiB of tokens), not the file, and every reader checks each block the
first time it reads it, against an index it checked against the pin it was given.

A reader (`TokenBlocks`) is what training and scoring index like a numpy array (`len`,
slices, `np.asarray`): a local file is memory-mapped where it lies (the OS caches its
pages); a file on an object store is read a block at a time by ranged reads into a cache
of at most `CACHE_BYTES` in memory, least recently used block out first. No task copies a
whole token file any more. A window that the trainer samples touches one block (two at a
boundary), so a file smaller than the cache is fetched at most once per task; a larger
one costs a block read per window that misses (see docs/performance.md).
"""
from __future__ import annotations

import hashlib
import io
import json
import tempfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from artifacts import ChecksumError, write_json
from pipeline.errors import StageError
from pipeline.store import storage

BLOCK_BYTES = 1 << 20  # 512 Ki tokens: a 64-byte hash per MiB of tokens in the index
CACHE_BYTES = 256 << 20  # per reader, of a file on an object store: a batch of 128 windows (2 blocks each)
PREFETCH_THREADS = 16  # ranged reads in flight at once (each a GET: their latency overlaps)
INDEX_FORMAT = "moie-token-blocks/1"
REWRITE = ("delete it and its .blocks.json and run the stage that wrote it again (`moie experts`, or `moie extend` "
           "for a new domain's)")


def load_tokens(location: str, scratch: str | Path, pins: dict[str, str] | None = None):
    """A token file (.npy) of the storage as an array of its tokens: read by blocks, each checked
    against its block index (itself checked against its sha256 in `pins`, {location: sha256},
    where that has it), where it has one; a file written before block indexes, memory-mapped from
    this node's copy (or from where it lies)."""
    if (pin := (pins or {}).get(location)) is not None or storage.exists(index_location(location)):
        return TokenBlocks(location, pin)
    return np.load(storage.local_copy(location, scratch), mmap_mode="r")


def index_location(location: str) -> str:
    """Where the block index of the token file at `location` lies."""
    return f"{location}.blocks.json"


def block_index(path: Path, block_bytes: int = BLOCK_BYTES) -> dict:
    """The block index of a local file: the sha256 of each block of `block_bytes` and of the whole."""
    whole, blocks, size = hashlib.sha256(), [], 0
    with open(path, "rb") as f:
        while chunk := f.read(block_bytes):
            whole.update(chunk)
            blocks.append(hashlib.sha256(chunk).hexdigest())
            size += len(chunk)
    return {"format": INDEX_FORMAT, "file_bytes": size, "file_sha256": whole.hexdigest(),
            "block_bytes": block_bytes, "blocks": blocks}


def put_token_file(local: Path, location: str, block_bytes: int = BLOCK_BYTES) -> dict:
    """Upload a local .npy token file to `location` with its block index; the index goes first
    and the .npy last, so a token file that exists is a complete pair. Returns the index."""
    index = block_index(local, block_bytes)
    with tempfile.TemporaryDirectory(prefix="moie-index-") as tmp:
        write_json(Path(tmp) / "index.json", index)
        storage.upload(Path(tmp) / "index.json", index_location(location))
    storage.upload(local, location)
    return index


def save_tokens(tokens: np.ndarray, location: str) -> dict:
    """A token array as a token file (with its block index) at `location`; returns the index."""
    with tempfile.TemporaryDirectory(prefix="moie-tokens-") as tmp:
        np.save(Path(tmp) / "tokens.npy", np.asarray(tokens, dtype=np.uint16))
        return put_token_file(Path(tmp) / "tokens.npy", location)


def token_pins(location: str) -> dict[str, str]:
    """What the registry records of a token file: {"file": sha256 of the file, "index": sha256 of
    its block index}; a file written before block indexes: {"file": ...} (hashed whole, here)."""
    if not storage.exists(index_location(location)):
        return {"file": storage.sha256(location)}
    raw = storage.read_bytes(index_location(location))
    return {"file": parse_index(raw, location)["file_sha256"], "index": hashlib.sha256(raw).hexdigest()}


def parse_index(raw: bytes, location: str) -> dict:
    """A block index's JSON, checked to be one."""
    try:
        index = json.loads(raw)
        ok = (index.get("format") == INDEX_FORMAT and isinstance(index.get("blocks"), list)
              and int(index["block_bytes"]) > 0 and int(index["file_bytes"]) >= 0
              and len(index["blocks"]) == -(-int(index["file_bytes"]) // int(index["block_bytes"])))
    except (ValueError, TypeError, KeyError, AttributeError):
        ok = False
    if not ok:
        raise ChecksumError(f"{index_location(location)} is not a block index moie wrote ({INDEX_FORMAT}); {REWRITE}")
    return index


def checked_index(location: str, pin: str | None) -> dict:
    """The block index of the token file at `location`, checked against `pin` (its sha256) when given."""
    where = index_location(location)
    if not storage.exists(where):
        raise ChecksumError(f"token file {location} has no block index ({where}); {REWRITE}")
    raw = storage.read_bytes(where)
    if pin is not None and (got := hashlib.sha256(raw).hexdigest()) != pin:
        raise ChecksumError(f"the block index {where} has sha256 {got}, not the {pin} recorded when its token file "
                            f"was written: the token file changed since; {REWRITE}")
    return parse_index(raw, location)


class TokenBlocks:
    """The tokens of a token file, indexed like a 1-D uint16 numpy array (len, slices of step 1,
    np.asarray), read block by block: each block is checked against the index's sha256 the
    first time this reader reads it. Local files are memory-mapped where they lie (a block
    changed after this reader checked it is not seen again, as with any memory map); files on an
    object store are read by ranged reads into a cache of at most `cache_bytes` (a batch whose
    windows touch more blocks than that reads some of them twice)."""

    def __init__(self, location: str, pin: str | None = None, cache_bytes: int = CACHE_BYTES):
        index = checked_index(location, pin)
        self.location, self.block = location, int(index["block_bytes"])
        self.hashes, self.file_bytes = index["blocks"], int(index["file_bytes"])
        size, _ = storage.stamp(location)
        if size != self.file_bytes:
            raise ChecksumError(f"token file {location} has {size} bytes, not the {self.file_bytes} its block index "
                                f"records: it changed since it was written; {REWRITE}")
        self.cache_bytes = max(cache_bytes, 2 * self.block)  # a window spans two blocks at most
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.checked: set[int] = set()
        self.fetched_bytes = self.reads = 0  # ranged reads from an object store
        self.pool = None  # threads of `prefetch`, made on its first use
        if storage.is_remote(location):
            self.mapped, self.file = None, storage.open_ranged(location)
        else:
            self.mapped, self.file = np.memmap(storage.local_path(location), dtype=np.uint8, mode="r"), None
        self.offset, self.length = self._header()

    def _header(self) -> tuple[int, int]:
        """(byte offset of the first token, number of tokens), from the .npy header."""
        lead = self._bytes(0, min(self.file_bytes, 12)).tobytes()  # magic, version, the header's length
        size = 10 + int.from_bytes(lead[8:10], "little") if lead[6:7] == b"\x01" else 12 + int.from_bytes(lead[8:12],
                                                                                                         "little")
        f = io.BytesIO(self._bytes(0, min(self.file_bytes, size)).tobytes())
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except ValueError as err:
            raise StageError(f"token file {self.location} is not a .npy file ({err}); {REWRITE}") from None
        if len(shape) != 1 or dtype != np.dtype("<u2") or self.file_bytes != f.tell() + 2 * shape[0]:
            raise StageError(f"token file {self.location} holds {dtype} of shape {shape}, not the 1-D uint16 tokens "
                             f"moie writes; {REWRITE}")
        return f.tell(), shape[0]

    # --- a numpy array's face ------------------------------------------------------------------

    dtype, ndim = np.dtype("<u2"), 1

    def __len__(self) -> int:
        return self.length

    @property
    def shape(self) -> tuple[int]:
        return (self.length,)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            if not -self.length <= key < self.length:
                raise IndexError(f"token {key} is outside token file {self.location} of {self.length} tokens")
            i = range(self.length)[key]
            return self[i:i + 1][0]
        if not isinstance(key, slice):
            raise TypeError(f"token file {self.location} reads slices and single indices, not {type(key).__name__}")
        start, stop, step = key.indices(self.length)
        if step != 1:
            raise TypeError(f"token file {self.location} reads slices of step 1, not {step}")
        stop = max(start, stop)
        data = self._bytes(self.offset + 2 * start, self.offset + 2 * stop)
        return data.view("<u2")

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if copy is False:
            raise ValueError(f"token file {self.location} is read by blocks: it cannot be an array without a copy")
        tokens = self[:]
        return tokens if dtype is None else tokens.astype(dtype)

    # --- blocks ------------------------------------------------------------------------------------

    def _bytes(self, start: int, stop: int) -> np.ndarray:
        """Bytes [start, stop) of the file (uint8), from its checked blocks."""
        if stop <= start:
            return np.zeros(0, dtype=np.uint8)
        first, last = start // self.block, (stop - 1) // self.block
        pieces = [self._block(b)[max(start - b * self.block, 0):stop - b * self.block] for b in range(first, last + 1)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _block(self, b: int) -> np.ndarray:
        if self.mapped is not None:  # local: the page cache holds it; check it once
            data = self.mapped[b * self.block:(b + 1) * self.block]
            if b not in self.checked:
                self._check(b, data)
                self.checked.add(b)
            return data
        if b in self.cache:
            self.cache.move_to_end(b)
            return self.cache[b]
        return self._keep(b, self._fetch(b))

    def _fetch(self, b: int) -> np.ndarray:
        """Block b of a file on an object store, by one ranged read, checked (safe in threads)."""
        start = b * self.block
        data = np.frombuffer(storage.read_at(self.file, self.location, start, min(self.block, self.file_bytes - start)),
                             dtype=np.uint8)
        self._check(b, data)
        return data

    def _keep(self, b: int, data: np.ndarray) -> np.ndarray:
        self.reads, self.fetched_bytes = self.reads + 1, self.fetched_bytes + len(data)
        self.cache[b] = data
        while len(self.cache) * self.block > self.cache_bytes:  # the least recently used out
            self.cache.popitem(last=False)
        return data

    def prefetch(self, starts, length: int) -> None:
        """Fetch the blocks that windows [start, start + length) of tokens touch and the cache
        lacks, by ranged reads in parallel: an object store's latency is paid once a batch, not
        once a window (at most what the cache holds; local files: nothing to do)."""
        if self.mapped is None:
            touched = {b for s in starts for b in range((self.offset + 2 * s) // self.block,
                                                         (self.offset + 2 * (s + length) - 1) // self.block + 1)}
            missing = sorted(b for b in touched if b < len(self.hashes) and b not in self.cache)
            for b in touched.intersection(self.cache):  # kept: this batch reads them
                self.cache.move_to_end(b)
            missing = missing[:self.cache_bytes // self.block - len(touched - set(missing))]
            if self.pool is None:
                self.pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="moie-tokens")
            for b, data in zip(missing, self.pool.map(self._fetch, missing)):
                self._keep(b, data)

    def _check(self, b: int, data: np.ndarray) -> None:
        if hashlib.sha256(data).hexdigest() != self.hashes[b]:
            raise ChecksumError(f"block {b} (bytes {b * self.block}-{b * self.block + len(data) - 1}) of token file "
                                f"{self.location} does not match the sha256 its block index records: the file "
                                f"changed since it was written; {REWRITE}")
