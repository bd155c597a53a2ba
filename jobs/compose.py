"""Compose stage entry point: `python -m jobs.compose --pipeline RUN_ID --config FILE
[--central models:/moie-central/N] [--experts models:/moie-expert/A,models:/moie-expert/B] [--set k=v ...]`.

Prints the pipeline's run id as the last line.
"""
import sys

from pipeline.cli import add_compose_args, compose_command, stage_main

if __name__ == "__main__":
    sys.exit(stage_main("python -m jobs.compose", __doc__, compose_command, extra=add_compose_args))
