"""One error type for everything a user can get wrong: the CLI prints its message as one line and exits non-zero."""


class KdbenchError(Exception):
    """A user-facing error whose message names the field, file or name at fault."""
