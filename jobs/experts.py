"""Experts stage entry point: `python -m jobs.experts --pipeline RUN_ID --config FILE [--set k=v ...]`.

Works the same under `ray job submit --working-dir . -- python -m jobs.experts ...`.
Prints the pipeline's run id as the last line.
"""
import argparse
import sys

from pipeline.cli import add_config_args, add_pipeline_arg, experts_command, run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.experts", description=__doc__)
    add_config_args(parser)
    add_pipeline_arg(parser)
    parser.set_defaults(func=experts_command)
    return run_main(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
