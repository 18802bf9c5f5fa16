"""The one error type a user can cause.

A `UserError` is a mistake in what the user gave us (a field, a file, a token id, a path). The CLI prints
its message as one line on stderr and exits with status 2; anything else is a bug and keeps its traceback.
Messages say what is wrong and where (the model, field, file or tensor).
"""


class UserError(Exception):
    """Bad input: reported as one line, exit status 2."""
