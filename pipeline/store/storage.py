"""Storage that every Ray node reaches: token files, training checkpoints and the seed.

A location is a string: a local path (the default, under the workdir: one machine, or a
file system every node mounts at the same path) or an object-store URI such as
`s3://bucket/prefix` (through `pyarrow.fs`; an S3-compatible endpoint is taken from
AWS_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL, credentials from the usual AWS settings).

Readers on a local location use the files where they are; on an object store they get a
copy in a node-local scratch directory (`local_copy`). Writers write locally and `upload`;
a directory is uploaded JSON last, and every safetensors file's JSON records its sha256,
so a reader never takes a half-written checkpoint for a whole one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from artifacts import atomic_path, sha256_file
from pipeline.errors import StageError, one_line

CHUNK = 8 << 20


def is_remote(location: str) -> bool:
    """An object-store URI (s3://, gs://, ...), not a local path."""
    return "://" in str(location) and not str(location).startswith("file://")


def join(location: str, *parts: str) -> str:
    """`location`/`parts` (a URI stays a URI, a path a path)."""
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(str(location).removeprefix("file://"), *parts))


def _filesystem(location: str):
    """(pyarrow FileSystem, path inside it) of a location."""
    import pyarrow.fs as pafs

    if not is_remote(location):
        return pafs.LocalFileSystem(), str(Path(str(location).removeprefix("file://")).expanduser().resolve())
    url = urlparse(location)
    if url.scheme == "s3":
        endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                    or os.environ.get("MLFLOW_S3_ENDPOINT_URL"))
        # delayed open: a file smaller than one part is one PutObject, not a multipart upload
        options = {"allow_delayed_open": True}
        if region := os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
            options["region"] = region
        if endpoint:
            parsed = urlparse(endpoint)
            options |= {"endpoint_override": parsed.netloc or parsed.path, "scheme": parsed.scheme or "https"}
            options.setdefault("region", "us-east-1")  # an S3-compatible server ignores it
        elif "region" not in options:
            try:
                options["region"] = pafs.resolve_s3_region(url.netloc)
            except OSError as err:
                raise StageError(f"the region of bucket {url.netloc!r} ({location}) cannot be resolved "
                                 f"({one_line(err)}); set AWS_REGION, or AWS_ENDPOINT_URL for an S3-compatible "
                                 "store") from None
        return pafs.S3FileSystem(**options), f"{url.netloc}{url.path}".rstrip("/")
    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds
        raise StageError(f"storage {location!r} cannot be opened ({one_line(err)}); use a local directory or an "
                         "object-store URI pyarrow supports, e.g. s3://bucket/prefix") from None


def _io(what: str, location: str):
    """A StageError naming the storage location, for an OSError of pyarrow."""
    return lambda err: StageError(f"storage {location} could not be {what} ({one_line(err)}); check that every "
                                  "node reaches it and holds credentials that may write it")


def _info(location: str):
    """pyarrow's FileInfo of a location."""
    fs, path = _filesystem(location)
    try:
        return fs.get_file_info(path)
    except OSError as err:
        raise _io("read", location)(err) from None


def kind(location: str) -> str:
    """'file', 'directory' or 'missing'."""
    import pyarrow.fs as pafs

    return {pafs.FileType.File: "file", pafs.FileType.Directory: "directory"}.get(_info(location).type, "missing")


def stamp(location: str) -> tuple[int, int]:
    """(size, modification time in ns) of a file: a change to it changes its stamp."""
    info = _info(location)
    return info.size or 0, info.mtime_ns or 0


def exists(location: str) -> bool:
    return kind(location) != "missing"


def names(location: str) -> list[str]:
    """The names of the files directly under a directory location (none if it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as err:
        raise _io("listed", location)(err) from None
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def parts_left(location: str, older_than_s: float) -> list[str]:
    """Unfinished uploads (`<file>.part-<id>`, see _put) anywhere under a location, last
    written more than older_than_s ago: what an upload killed mid-way leaves."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as err:
        raise _io("listed", location)(err) from None
    now_ns = time.time_ns()
    return sorted(join(location, i.path.removeprefix(path).lstrip("/")) for i in infos
                  if i.type == pafs.FileType.File and ".part-" in i.base_name
                  and now_ns - (i.mtime_ns or now_ns) > older_than_s * 1e9)


def _files(local: Path) -> list[Path]:
    """The files of a local directory, JSON last (each JSON completes the safetensors it describes)."""
    found = [p for p in sorted(local.rglob("*")) if p.is_file()]
    return sorted(found, key=lambda p: p.suffix == ".json")


def upload(local: str | Path, location: str) -> None:
    """Copy a local file or directory to `location` (a no-op when it is that very path)."""
    local = Path(local)
    fs, path = _filesystem(location)
    if not is_remote(location):
        if Path(path) == local.resolve():
            return
        for src in _files(local) if local.is_dir() else [local]:  # each file whole or not at all
            with atomic_path(Path(path) / src.relative_to(local) if src != local else Path(path)) as tmp:
                shutil.copyfile(src, tmp)
        return
    try:
        for src in _files(local) if local.is_dir() else [local]:
            dst = path if src == local else f"{path}/{src.relative_to(local).as_posix()}"
            _put(fs, src, dst)
    except OSError as err:
        raise _io("written", location)(err) from None


def _put(fs, src: Path, dst: str) -> None:
    """One file to an object store, under a part name first: closing a pyarrow stream completes
    the upload even when an error cut it short, so only a whole file is moved to `dst`."""
    part = f"{dst}.part-{uuid.uuid4().hex[:8]}"
    try:
        with open(src, "rb") as f, fs.open_output_stream(part) as out:
            shutil.copyfileobj(f, out, CHUNK)
        fs.move(part, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(part)
        raise


def download(location: str, local: str | Path) -> Path:
    """Copy the file or directory at `location` to `local`; the local path."""
    import pyarrow.fs as pafs

    local = Path(local)
    fs, path = _filesystem(location)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise StageError(f"storage {location} does not exist: the stage that writes it has not run, or it was "
                             "deleted; run that stage again")
        inside = pafs.FileSelector(path, recursive=True)
        sources = ([info] if info.type == pafs.FileType.File else
                   [i for i in fs.get_file_info(inside) if i.type == pafs.FileType.File])
        for src in sorted(sources, key=lambda i: i.path.endswith(".json")):
            dst = local if src.path == path else local / src.path[len(path):].lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(src.path) as f, open(dst, "wb") as out:
                shutil.copyfileobj(f, out, CHUNK)
    except OSError as err:
        raise _io("read", location)(err) from None
    return local


def local_copy(location: str, scratch: str | Path) -> Path:
    """A local path holding the file or directory at `location`: the location itself when it is
    local, else a copy under `scratch` (made once per scratch directory, completely or not at all)."""
    if not is_remote(location):
        return local_path(location)
    key = hashlib.sha256(location.encode()).hexdigest()[:16]
    target = Path(scratch) / key / location.rstrip("/").rsplit("/", 1)[-1]
    if not target.exists():
        Path(scratch).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=Path(scratch).resolve(), prefix=".download-"))
        try:
            download(location, staging / target.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / target.name, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def remove(location: str) -> None:
    """Delete a file or directory (nothing if it does not exist)."""
    fs, path = _filesystem(location)
    what = kind(location)
    try:
        if what == "directory":
            fs.delete_dir(path)
        elif what == "file":
            fs.delete_file(path)
    except OSError as err:
        raise _io("deleted from", location)(err) from None


def move(location: str, new: str) -> None:
    """Rename a file or directory (an object store copies, then deletes)."""
    if not exists(location):
        return
    if not is_remote(location):
        os.replace(_filesystem(location)[1], _filesystem(new)[1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        upload(download(location, Path(tmp) / "copy"), new)
    remove(location)


# --- training checkpoints (step-<n>.safetensors + step-<n>.json, the JSON written last) -------------------


def checkpoint_steps(location: str) -> list[int]:
    """Steps of the complete checkpoints at a location (their JSON is written last), oldest first."""
    from experts.checkpoint import checkpoint_step  # (torch: loaded where checkpoints are)

    return sorted(s for n in names(location) if (s := checkpoint_step(n)) is not None)


class CheckpointMirror:
    """A training task's checkpoint directory on this node, mirrored to `location` in storage.

    A local location is used as it is. For an object store, the newest complete checkpoint
    is copied to `scratch` before training (so the trainer resumes from it), and every
    checkpoint the trainer writes is uploaded at once (`push`), older ones deleted beyond `keep`:
    a task that loses its node loses at most one checkpoint interval."""

    def __init__(self, location: str, scratch: str | Path, keep: int = 2):
        from experts.checkpoint import checkpoint_name  # (torch: only where checkpoints are written)

        self.location, self.keep = location, keep
        self.remote = is_remote(location)
        self.dir = Path(scratch) / "checkpoints" if self.remote else local_path(location)
        self.dir.mkdir(parents=True, exist_ok=True)
        steps = checkpoint_steps(location) if self.remote else []
        for step in reversed(steps):  # the newest whole one (its tensors match the sha256 its JSON records)
            name = checkpoint_name(step)
            for suffix in (".safetensors", ".json"):  # the JSON last: it marks the pair complete
                download(join(location, name + suffix), self.dir / (name + suffix))
            recorded = json.loads((self.dir / f"{name}.json").read_text(encoding="utf-8")).get("tensors_sha256")
            if recorded == sha256_file(self.dir / f"{name}.safetensors"):
                break
            print(f"checkpoint {join(location, name)} is damaged (its tensors do not match the sha256 its JSON "
                  "records): resuming from the one before", flush=True)
            for suffix in (".safetensors", ".json"):
                (self.dir / (name + suffix)).unlink()
        else:
            if steps:
                raise StageError(f"every checkpoint in {location} is damaged; delete them there to train from the "
                                 "start, or restore them")

    def push(self, json_path: str | Path) -> None:
        """Upload the checkpoint whose JSON is `json_path` (tensors first), then drop the old ones."""
        from experts.checkpoint import checkpoint_name

        if not self.remote:
            return
        json_path = Path(json_path)
        upload(json_path.with_suffix(".safetensors"), join(self.location, json_path.stem + ".safetensors"))
        upload(json_path, join(self.location, json_path.name))
        for step in checkpoint_steps(self.location)[:-self.keep]:
            for suffix in (".json", ".safetensors"):  # the JSON first: an incomplete pair is never taken
                remove(join(self.location, checkpoint_name(step) + suffix))


# --- reading without copying -----------------------------------------------------------------------


def sha256(location: str) -> str:
    """The sha256 of the file at `location`, streamed."""
    fs, path = _filesystem(location)
    digest = hashlib.sha256()
    try:
        with fs.open_input_stream(path) as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except OSError as err:
        raise _io("read", location)(err) from None
    return digest.hexdigest()


def npy_length(location: str) -> int:
    """The length of the first axis of the .npy array at `location`, from its header alone."""
    fs, path = _filesystem(location)
    try:
        with fs.open_input_file(path) as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(f)
    except OSError as err:
        raise _io("read", location)(err) from None
    return shape[0]


def read_bytes(location: str) -> bytes:
    fs, path = _filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as err:
        raise _io("read", location)(err) from None


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def local_path(location: str) -> Path:
    """The path of a local location (not an object store's)."""
    return Path(_filesystem(location)[1])


def open_ranged(location: str):
    """The file at `location` open for ranged reads (`read_at`): on an object store, each read
    is one ranged GET of the bytes asked for."""
    fs, path = _filesystem(location)
    try:
        return fs.open_input_file(path)
    except OSError as err:
        raise _io("read", location)(err) from None


def read_at(file, location: str, offset: int, nbytes: int) -> bytes:
    """`nbytes` at `offset` of a file `open_ranged` opened (at `location`)."""
    try:
        return file.read_at(nbytes, offset)
    except OSError as err:
        raise _io("read", location)(err) from None


def parent(location: str) -> str:
    """The directory holding `location`."""
    return location.rstrip("/").rsplit("/", 1)[0] if is_remote(location) else str(Path(location).parent)
