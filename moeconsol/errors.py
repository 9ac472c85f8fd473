"""The one exception type that means "the user gave us something we cannot use".

The CLI prints its message as a single line on stderr and exits with code 2. Library
callers can catch it like any other exception. Messages say what is wrong and, where
possible, what to do about it.
"""


class MoeconsolError(Exception):
    """Bad input: a path, a checkpoint, an option value. Never a bug in moeconsol."""
