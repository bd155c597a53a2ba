"""Training's token reads, side by side in one run: the previous readers (a memory map of a
local file; a whole-file copy from an object store, then a memory map) against block reads
(`pipeline.store.tokens.TokenBlocks`: local memory map checked block by block; ranged reads
from an object store into a bounded cache, with and without the per-batch parallel prefetch).

    python bench/token_reads.py                    # 256 MB of tokens, 40 batches of 16 x 257 (~5 min)
    python bench/token_reads.py --mb 64 --steps 200 --latency-ms 50

The object store is moto's S3 server on 127.0.0.1 (what the tests use): its rows give the bytes
and reads per window; their times are moto's (each ranged read of a large object costs it
~0.1 s), not S3's. The time to the first batch includes the whole-file copy where there is one.
The last rows are a model: the same reader, its ranged reads served from the same bytes on
local disk after a wait of `--latency-ms` (30 by default, of the order of an S3 GET's) — what
the per-batch prefetch overlaps. Windows are drawn as the trainer draws them
(`experts.trainer.sample_batch`), the same seed for every row.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_parallel import cpu_name  # noqa: E402  (bench/ is this script's directory)


class WithoutPrefetch:
    """A reader seen without its `prefetch`: the trainer then reads window by window."""

    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, key):
        return self.reader[key]


class Delayed:
    """A file whose every ranged read waits `seconds` first: a model of an object store's latency
    (the wait releases the GIL, as a network read does)."""

    def __init__(self, file, seconds: float):
        self.file, self.seconds = file, seconds

    def read_at(self, nbytes: int, offset: int) -> bytes:
        time.sleep(self.seconds)
        return self.file.read_at(nbytes, offset)


@contextlib.contextmanager
def s3_server():
    """moto's S3 server on 127.0.0.1, in a process of its own (in this one it would share this
    one's GIL), with a bucket `moie`; this process's environment points at it."""
    import boto3
    import botocore.exceptions

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    try:
        client = boto3.client("s3", region_name="us-east-1")
        deadline = time.monotonic() + 60
        while True:  # until it answers
            try:
                client.create_bucket(Bucket="moie")
                break
            except botocore.exceptions.EndpointConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("moto's S3 server did not start") from None
                time.sleep(0.2)
        yield client
    finally:
        server.terminate()
        server.wait()


def sampled(tokens, steps: int, batch: int, seq: int) -> tuple[float, float, int]:
    """(seconds to the first batch, windows per second after it, a checksum of what was read)."""
    import torch

    from experts.trainer import sample_batch

    generator = torch.Generator().manual_seed(0)
    began = time.perf_counter()
    x, _ = sample_batch(tokens, batch, seq, generator, torch.device("cpu"))
    first = time.perf_counter() - began
    total = int(x.sum())
    began = time.perf_counter()
    for _ in range(steps - 1):
        x, _ = sample_batch(tokens, batch, seq, generator, torch.device("cpu"))
        total += int(x.sum())
    return first, (steps - 1) * batch / (time.perf_counter() - began), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=256, help="size of the token file")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--latency-ms", type=float, default=30, help="added to each ranged read of the last rows")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    with s3_server() as s3:
        run(args, s3)


def run(args, s3) -> None:
    import numpy as np

    from pipeline.store import storage
    from pipeline.store.tokens import CACHE_BYTES, TokenBlocks, index_location, put_token_file

    print(f"# bench/token_reads.py — {cpu_name()}, a {args.mb} MB token file, {args.steps} batches of "
          f"{args.batch} x {args.seq + 1} tokens\n")
    with tempfile.TemporaryDirectory(prefix="moie-token-reads-") as tmp:
        local = Path(tmp) / "tokens.npy"
        np.save(local, np.random.default_rng(0).integers(0, 259, args.mb << 19).astype(np.uint16))
        stored = Path(tmp) / "store" / "tokens.npy"
        index = put_token_file(local, str(stored))
        remote = "s3://moie/bench/tokens.npy"  # (moto's server fails pyarrow's multipart uploads: boto3's)
        for path in (index_location(str(stored)), str(stored)):
            s3.upload_file(path, "moie", "bench/" + Path(path).name)
        file_bytes, block = index["file_bytes"], index["block_bytes"]
        small = max(2 * block, file_bytes // 8)

        def copy_then_map():
            return np.load(storage.local_copy(remote, Path(tmp) / f"scratch-{time.monotonic_ns()}"), mmap_mode="r")

        def modelled(cache_bytes: int):
            """A reader of the remote file whose ranged reads go to the same bytes on local disk,
            each after a wait of --latency-ms (moto's own reads cost more as its objects grow)."""
            import pyarrow.fs as pafs

            reader = TokenBlocks(remote, cache_bytes=cache_bytes)
            reader.file = Delayed(pafs.LocalFileSystem().open_input_file(str(stored)), args.latency_ms / 1e3)
            return reader

        slow = f"model: {args.latency_ms:g} ms a read"
        rows = [("local", "memory map (previous)", lambda: np.load(local, mmap_mode="r"), None),
                ("local", "blocks: memory map, each block checked once", lambda: TokenBlocks(str(stored)), None),
                ("s3", "whole-file copy, then memory map (previous)", copy_then_map, None),
                ("s3", f"blocks: ranged reads, cache {CACHE_BYTES >> 20} MB, prefetch",
                 lambda: TokenBlocks(remote), "prefetch"),
                ("s3", f"blocks: ranged reads, cache {small >> 20} MB (1/8 of the file), window by window",
                 lambda: TokenBlocks(remote, cache_bytes=small), "none"),
                (slow, f"blocks: ranged reads, cache {small >> 20} MB, prefetch", lambda: modelled(small), "prefetch"),
                (slow, f"blocks: ranged reads, cache {small >> 20} MB, window by window", lambda: modelled(small),
                 "none")]
        print("| store | reader | first batch s (open + read) | windows/s after | MB read | reads | KB read per "
              "window | same tokens |")
        print("|---|---|---|---|---|---|---|---|")
        reference = None
        for store, name, open_reader, prefetch in rows:
            began = time.perf_counter()
            reader = open_reader()
            opened = time.perf_counter() - began
            first, rate, total = sampled(WithoutPrefetch(reader) if prefetch == "none" else reader, args.steps,
                                         args.batch, args.seq)
            reference = total if reference is None else reference
            fetched = getattr(reader, "fetched_bytes", file_bytes if store == "s3" else 0)
            reads = getattr(reader, "reads", "—")
            windows = args.steps * args.batch
            print(f"| {store} | {name} | {opened + first:.3f} | {rate:,.0f} | {fetched / 1e6:,.1f} | {reads} | "
                  f"{fetched / windows / 1e3:,.1f} | {'yes' if total == reference else 'NO'} |")


if __name__ == "__main__":
    main()
