"""What the command lines share: one `error:` line and exit status 2 for an error they expect,
and argparse types that refuse a bad number where it is typed."""

import argparse
import math
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


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    return _at_least(text, 1)


def natural_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    return _at_least(text, 0)


def finite_float(text: str) -> float:
    """argparse type: a finite number (no nan, no inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is less than {least}")
    return value
