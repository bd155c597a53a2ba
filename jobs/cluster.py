"""Cluster stage entry point: `python -m jobs.cluster --config FILE [--pipeline RUN_ID] [--set k=v ...]`.

Works the same under `ray job submit --working-dir . -- python -m jobs.cluster ...`.
Prints the pipeline's parent run id as the last line.
"""
import argparse
import sys

from pipeline.cli import add_config_args, add_pipeline_arg, cluster_command, run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.cluster", description=__doc__)
    add_config_args(parser)
    add_pipeline_arg(parser)
    parser.set_defaults(func=cluster_command)
    return run_main(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
