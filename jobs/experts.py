"""Experts stage entry point: `python -m jobs.experts --pipeline RUN_ID --config FILE [--set k=v ...]`.

Works the same under `ray job submit --working-dir . -- python -m jobs.experts ...`.
Prints the pipeline's run id as the last line.
"""
import sys

from pipeline.cli import experts_command, stage_main

if __name__ == "__main__":
    sys.exit(stage_main("python -m jobs.experts", __doc__, experts_command))
