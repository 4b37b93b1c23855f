"""The one exception type a user sees: bad input, named, with what to do about it."""


class UserError(ValueError):
    """Bad input from the user (a path, a flag, a file). The CLI prints its message on one line and exits 2."""
