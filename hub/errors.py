"""The one exception type the CLI turns into a readable message instead of a traceback."""


class LoraflowError(Exception):
    """A problem the user can act on: the message says what was wrong, where, and what to do."""
