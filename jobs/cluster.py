"""Cluster stage entry point: `python -m jobs.cluster --config FILE [--pipeline RUN_ID] [--set k=v ...]`.

Works the same under `ray job submit --working-dir . -- python -m jobs.cluster ...`.
Prints the pipeline's parent run id as the last line.
"""
import sys

from pipeline.cli import cluster_command, stage_main

if __name__ == "__main__":
    sys.exit(stage_main("python -m jobs.cluster", __doc__, cluster_command))
