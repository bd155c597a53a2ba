"""Errors a user can cause with a stage's inputs, shown as one `moie: error:` line."""
import re

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class StageError(ValueError):
    """A stage that cannot run on the inputs it was given (missing outputs of an earlier
    stage, models that do not fit together, an impossible configuration)."""


def one_line(err: BaseException) -> str:
    """An exception as one line: its message's lines joined, terminal colour codes removed."""
    text = ANSI_ESCAPE.sub("", str(err))
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__
