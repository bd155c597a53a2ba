"""Errors a user can cause with a stage's inputs, shown as one `moie: error:` line."""


class StageError(ValueError):
    """A stage that cannot run on the inputs it was given (missing outputs of an earlier
    stage, models that do not fit together, an impossible configuration)."""
