"""The one exception type a user can cause. The CLI prints its message on one line and exits non-zero."""


class UserError(Exception):
    """Bad input, a bad file or a bad option: something the user can fix."""
