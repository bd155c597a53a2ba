"""What every Ray task sets up before it trains or scores (no Ray needed: it runs in the task's process)."""
import os

import pytest
import torch

from pipeline.ray_runtime import ResourceError, gpus_per_task, granted_device, use_granted_cpus


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


@pytest.mark.parametrize("device, num_gpus, node_gpus, asked", [
    ("cpu", None, 8, 0.0),  # cpu: never a GPU, whatever the nodes have
    ("auto", None, 0, 0.0),  # auto: the CPU on a cluster without GPUs ...
    ("auto", None, 8, 1.0),  # ... one GPU per task where a node has them
    ("auto", 0.5, 8, 0.5),  # a section's own number wins: two tasks share a GPU
    ("auto", 0, 8, 0.0),
    ("cuda", None, 8, 1.0),
    ("cuda", 0.5, 8, 0.5),
])
def test_each_task_asks_for_the_gpus_the_device_and_its_section_say(device, num_gpus, node_gpus, asked):
    assert gpus_per_task(device, num_gpus, node_gpus) == asked


def test_a_task_granted_no_gpu_runs_on_the_cpu():
    assert granted_device(0) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no CUDA device")
def test_a_task_granted_a_gpu_torch_cannot_see_fails_in_one_line_saying_why():
    with pytest.raises(ResourceError) as err:
        granted_device(1)
    message = str(err.value)
    assert "\n" not in message and "num_gpus=1" in message and "CPU build" in message and "device=cpu" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_task_granted_a_gpu_runs_on_cuda():
    assert granted_device(1).type == "cuda"
