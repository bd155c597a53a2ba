"""The one base class of errors a user can fix (bad input, a missing earlier stage, a file that
changed): the CLI turns any MoieError into one `moie: error:` line and exit code 2. It lives on the
ground floor so that model packages, which import nothing above them, can raise it too."""


class MoieError(Exception):
    """An error the user can fix; its message says what was wrong and what would be valid."""
