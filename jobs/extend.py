"""Extend stage entry point: `python -m jobs.extend --pipeline RUN_ID --config FILE
--files PATH... [--domain NAME] [--set extend.branch=seed ...]`.

Adds a domain to a finished pipeline; prints the extended composition's URI as the last line.
"""
import sys

from pipeline.cli import add_extend_args, extend_command, stage_main

if __name__ == "__main__":
    sys.exit(stage_main("python -m jobs.extend", __doc__, extend_command, extra=add_extend_args))
