"""The whole pipeline as one job: `python -m jobs.pipeline --config FILE [--resume RUN_ID] [--set k=v ...]`.

cluster -> experts -> compose -> evaluate under one parent run; with --resume, the stages
that pipeline completed are skipped. Prints the results table and, last, the run id.
"""
import sys

from pipeline.cli import add_run_args, run_command, stage_main

if __name__ == "__main__":
    sys.exit(stage_main("python -m jobs.pipeline", __doc__, run_command, extra=add_run_args))
