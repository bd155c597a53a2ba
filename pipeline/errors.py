"""Errors a user can cause with a stage's inputs, shown as one `moie: error:` line. Every such
error is a MoieError (defined on the ground floor, `artifacts.errors`, so model packages raise it
too); the CLI catches that one class."""
import re

from artifacts.errors import MoieError  # noqa: F401  (the base class, re-exported)

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class StageError(MoieError, ValueError):
    """A stage that cannot run on the inputs it was given (missing outputs of an earlier
    stage, models that do not fit together, an impossible configuration)."""


def one_line(err: BaseException) -> str:
    """An exception as one line: its message's lines joined, terminal colour codes removed."""
    text = ANSI_ESCAPE.sub("", str(err))
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__
