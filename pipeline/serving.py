"""Compatibility re-export, kept for models registered by moie 0.1.0 before the `serve/` wing: their
logged `pyfunc_entry.py` imports `pipeline.serving.MoieModel` by name. Remove when no store holds a
model whose MLmodel names moie 0.1.0 (a registered model cannot be re-logged in place)."""
from pipeline.serve.serving import MoieModel  # noqa: F401
