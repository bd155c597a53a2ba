"""moie's orchestration: the CLI, config, Ray, and four wings — store/ (where things are kept),
text/ (what comes in), results/ (what a person reads), serve/ (models in use) — beside stages/.

Importing it sets the loopback / offline / no-telemetry defaults that every moie
process (driver, Ray worker, test) must run with; a value the user exported wins.
"""
import os

LOCAL_DEFAULTS = {
    # datasets / huggingface_hub: never download from the hub unless the user opts in.
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    # datasets: moie reads text, never torch-formatted rows; without this every streamed data set
    # imports torch (~150 MB more in each of the cluster stage's shard workers)
    "USE_TORCH": "0",
    # MLflow and Ray: no telemetry, no usage stats.
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar per download floods job logs
    "DO_NOT_TRACK": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray: keep a locally started node on 127.0.0.1 and without token auth (loopback only).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
}

for _key, _value in LOCAL_DEFAULTS.items():
    # with RAY_ADDRESS set (`ray job submit` sets it) the process joins a cluster whose nodes
    # have their own addresses: pinning this process to 127.0.0.1 would hide its node from it
    if not (_key == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" and os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault(_key, _value)
