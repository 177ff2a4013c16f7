"""The one exception type for mistakes a user can fix; CLIs print it as one line and exit 2."""


class UserError(Exception):
    """Bad input or environment: the message says what was wrong and what to do."""
