"""What every Ray task sets up before it trains or scores (no Ray needed: it runs in the task's process)."""
import os

import torch

from pipeline.ray_runtime import use_granted_cpus


def test_a_task_compiles_into_moie_s_own_cache_unless_the_user_named_one(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("MOIE_CACHE_DIR", str(tmp_path / "moie"))
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        use_granted_cpus(1)
        assert torch.get_num_threads() == 1
        # shared by every task of the node and kept between runs, in the user's cache (not /tmp)
        assert str(tmp_path / "moie" / "inductor") == os.environ["TORCHINDUCTOR_CACHE_DIR"]
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
        use_granted_cpus(1)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    finally:
        torch.set_num_threads(threads)
