"""Evaluate stage entry point: `python -m jobs.evaluate --pipeline RUN_ID --config FILE
[--eval-data SOURCE] [--set k=v ...]`.

Scores dense, central, experts, oracle, cBTM and the pipeline's compositions on held-out
text, logs the results to MLflow, prints the table and, last, the pipeline's run id.
"""
import sys

from pipeline.cli import add_evaluate_args, evaluate_command, stage_main

if __name__ == "__main__":
    sys.exit(stage_main("python -m jobs.evaluate", __doc__, evaluate_command, extra=add_evaluate_args))
