"""Shared fixtures: a private MLflow store per test, one local Ray for the session,
and a real `ray start --head` for the job-submission test."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import pipeline  # noqa: F401  (sets the loopback / offline / no-telemetry defaults)

sys.path.insert(0, str(Path(__file__).parent))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def moie_home(tmp_path, monkeypatch):
    """A fresh MLflow sqlite store + artifact directory for this test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MOIE_HOME", str(tmp_path / "moie-home"))
    return tmp_path / "moie-home"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs, no dashboard, 127.0.0.1) shared by the session."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="moie-rt-", dir="/tmp")  # short: Unix socket paths <= 107 bytes
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             _temp_dir=temp_dir, log_to_driver=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head():
    """A real Ray head (`ray start --head --block`) on free loopback ports; yields the
    dashboard address (the Jobs API). Stopped with SIGTERM to its own process group."""
    temp_dir = tempfile.mkdtemp(prefix="moie-rh-", dir="/tmp")
    dash = free_port()
    env = dict(os.environ, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = ["ray", "start", "--head", "--block", "--num-cpus", "2", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1",
           "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--temp-dir", temp_dir]
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        json.loads(wait_for_http(f"{address}/api/version", proc, Path(temp_dir) / "head.log", "ray start"))
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_http(url: str, proc: subprocess.Popen, log_path: Path, what: str, timeout: float = 90) -> bytes:
    """The body of the first successful GET of `url` while `proc` (the server, logging to
    log_path) runs; RuntimeError with the log's tail if it exits or does not answer in time."""
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read()
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{what} at {url} not up after {timeout}s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible object store on 127.0.0.1 (moto's server), with a bucket `moie`; yields
    the environment that points boto3, pyarrow and MLflow at it (dummy credentials)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}
    try:
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket="moie")
        yield env
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This test's environment points at the S3 server."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return s3_server
