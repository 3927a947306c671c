"""What the command lines do with an error they expect: one line on stderr, exit status 2."""

import sys


def error_exit(error: Exception) -> int:
    """Prints `error` as one "error: ..." line (an OSError's file name first) and returns 2."""
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        message = f"{where}{error.strerror or error}"
    else:
        message = str(error)
    print(f"error: {message}", file=sys.stderr)
    return 2
