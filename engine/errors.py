"""Errors the engine raises for bad user input.

`train.py` prints these as one clear line (no traceback) and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
    """A problem with what the user gave us: a file, a flag, a config value."""
