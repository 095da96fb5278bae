"""One exception type for mistakes a user can fix; the CLI prints it as a single line and exits non-zero."""


class DiffkitError(ValueError):
    """Bad input: an unknown pair or preset, a layer out of range, a missing or corrupt file."""
