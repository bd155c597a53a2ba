"""A private moie store (MLflow sqlite + artifacts) for a module-scoped fixture."""
from __future__ import annotations

import contextlib

import pytest


@contextlib.contextmanager
def module_home(tmp_path_factory, name: str):
    """Like the moie_home fixture, for a module's shared pipeline: a fresh store its tests share."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp(name)
        mp.setenv("MOIE_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield home
