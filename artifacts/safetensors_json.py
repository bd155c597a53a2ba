"""Tensors on disk: `<name>.safetensors` + `<name>.json`, written atomically, checked by sha256.

The one writer and reader of every weight file moie makes — training checkpoints, exported
models, the cBTM router, composition parameters. Nothing is pickled: tensors go to
safetensors, everything else to JSON; the JSON is written last and records the sha256 of
the tensors, so a reader can tell a complete, untouched pair from anything else.
Tensors may be numpy arrays or torch tensors (read back as the framework asked for).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from artifacts.errors import MoieError


class ArtifactError(MoieError, ValueError):
    """A tensors + JSON pair that is missing or incomplete."""


class ChecksumError(ArtifactError):
    """An artifact whose bytes do not match the sha256 recorded for it."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(directory: str | Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{path relative to directory (POSIX): sha256} of every file under it, but files named in skip."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): sha256_file(p)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in skip}


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


def write_tensors(path: str | Path, tensors: dict[str, Any]) -> str:
    """Write numpy arrays or torch tensors (not a mix) as safetensors atomically; return the sha256."""
    with atomic_path(path) as tmp:
        if tensors and not isinstance(next(iter(tensors.values())), np.ndarray):
            from safetensors.torch import save_file as save_torch

            save_torch({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        else:
            from safetensors.numpy import save_file as save_numpy

            save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    return sha256_file(path)


def read_tensors(path: str | Path, expected_sha256: str | None = None,
                 framework: Literal["np", "pt"] = "np") -> dict[str, Any]:
    """Read a safetensors file, refusing it if its sha256 differs from the one recorded."""
    verify_sha256(path, expected_sha256)
    if framework == "pt":
        from safetensors.torch import load_file as load_torch

        return load_torch(str(path))
    from safetensors.numpy import load_file as load_numpy

    return load_numpy(str(path))


def verify_sha256(path: str | Path, expected: str | None, shown: str | None = None,
                  fix: str = "re-create it, or fetch it again from the MLflow run") -> None:
    """ChecksumError unless the file's sha256 is `expected` (nothing to check when None).
    `shown`: what to call the file in the message (e.g. where it was downloaded from)."""
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"{shown or path} has sha256 {actual} but {expected} was recorded for it: "
                            f"the file was changed or corrupted" + (f"; {fix}" if fix else ""))


def save_state(directory: str | Path, name: str, tensors: dict[str, Any], meta: dict) -> dict[str, str]:
    """Write `<name>.safetensors`, then `<name>.json` (meta + the tensors' sha256), into directory.

    Returns {filename: sha256} of both files, for the run's manifest."""
    directory = Path(directory)
    tensors_sha = write_tensors(directory / f"{name}.safetensors", tensors)
    json_sha = write_json(directory / f"{name}.json", {**meta, "tensors_sha256": tensors_sha})
    return {f"{name}.safetensors": tensors_sha, f"{name}.json": json_sha}


def load_state(directory: str | Path, name: str, expected_sha256: str | None = None,
               framework: Literal["np", "pt"] = "np",
               fix: str = "re-create it, or fetch it again from the MLflow run") -> tuple[dict[str, Any], dict]:
    """Read what save_state wrote, verifying the tensors against the sha256 in the JSON
    (and against `expected_sha256`, e.g. from the MLflow manifest, when given); `fix`: what a
    checksum error tells the user to do ('' to leave it to the caller)."""
    directory = Path(directory)
    meta_path, tensors_path = directory / f"{name}.json", directory / f"{name}.safetensors"
    if not meta_path.is_file() or not tensors_path.is_file():
        raise ArtifactError(f"{directory} has no complete {name}.safetensors + {name}.json "
                            f"(found: {', '.join(p.name for p in (meta_path, tensors_path) if p.is_file()) or 'neither'})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{meta_path} is not valid JSON ({err}): the file was changed or cut short; "
                            "re-create it, or fetch it again from the MLflow run") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tensors_sha256"), str):
        raise ArtifactError(f"{meta_path} records no tensors_sha256 (not written by moie, or edited): "
                            f"refusing to load {tensors_path.name} unverified")
    verify_sha256(tensors_path, meta["tensors_sha256"], fix=fix)
    if expected_sha256 is not None:
        verify_sha256(tensors_path, expected_sha256, fix=fix)
    return read_tensors(tensors_path, None, framework), meta
