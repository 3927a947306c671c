"""What stops a training run, each with a message that says why."""


class ConfigError(ValueError):
    """A training config that cannot run; raised before any compute."""


class DivergedError(ValueError):
    """A step whose loss, gradient or update was not finite; the run stopped before it."""


class DataError(ValueError):
    """Data the run cannot train on: too many unreadable images."""
