"""Ground floor: safetensors + JSON files with their sha256. Imports neither torch (until a
torch tensor is written or read), Ray nor MLflow, so every other package may use it."""
from artifacts.errors import MoieError
from artifacts.safetensors_json import (ArtifactError, ChecksumError, atomic_path, load_state, read_tensors, save_state,
                                        sha256_file, sha256_tree, verify_sha256, write_json, write_tensors)

__all__ = ["ArtifactError", "ChecksumError", "MoieError", "atomic_path", "load_state", "read_tensors", "save_state",
           "sha256_file", "sha256_tree", "verify_sha256", "write_json", "write_tensors"]
