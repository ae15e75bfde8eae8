"""The one exception type for mistakes a user can fix; the CLI prints it without a traceback."""


class GeosocError(Exception):
    """Bad input or environment: the message says which file/key/value and what was expected."""
