"""Artifact I/O: safetensors + JSON, written atomically, each with a sha256.

Nothing is pickled: tensors go to safetensors, everything else to JSON.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors.numpy import load_file, save_file


class ChecksumError(ValueError):
    """An artifact whose bytes do not match the sha256 recorded for it."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, data) -> str:
    """Write JSON atomically; return its sha256."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    return sha256_file(path)


def write_tensors(path: str | Path, tensors: dict[str, np.ndarray]) -> str:
    """Write numpy arrays as safetensors atomically; return the file's sha256."""
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    return sha256_file(path)


def read_tensors(path: str | Path, expected_sha256: str | None = None) -> dict[str, np.ndarray]:
    """Read a safetensors file, refusing it if its sha256 differs from the one recorded."""
    verify_sha256(path, expected_sha256)
    return load_file(str(path))


def verify_sha256(path: str | Path, expected: str | None) -> None:
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"{path} has sha256 {actual} but {expected} was recorded for it: "
                            "the file was changed or corrupted; re-create it (run the stage again) "
                            "or fetch it again from the MLflow run")


def save_state(directory: str | Path, name: str, tensors: dict[str, np.ndarray], meta: dict) -> dict[str, str]:
    """Write `<name>.safetensors` and `<name>.json` (meta + the tensors' sha256) into directory.

    Returns {filename: sha256} of both files, for the run's manifest."""
    directory = Path(directory)
    tensors_sha = write_tensors(directory / f"{name}.safetensors", tensors)
    json_sha = write_json(directory / f"{name}.json", {**meta, "tensors_sha256": tensors_sha})
    return {f"{name}.safetensors": tensors_sha, f"{name}.json": json_sha}


def load_state(directory: str | Path, name: str, expected_sha256: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Read what save_state wrote, verifying the tensors against the sha256 in the JSON
    (and against `expected_sha256`, e.g. from the MLflow manifest, when given)."""
    directory = Path(directory)
    meta_path, tensors_path = directory / f"{name}.json", directory / f"{name}.safetensors"
    for p in (meta_path, tensors_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist; expected {name}.json and {name}.safetensors in {directory}")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    verify_sha256(tensors_path, meta.get("tensors_sha256"))
    return read_tensors(tensors_path, expected_sha256), meta
