"""scaling: image-classification scaling studies in JAX/Flax NNX."""


class ScalingError(ValueError):
    """Bad user input (a name, a setting, a path).

    The command line prints the message as one line and exits with status 2, so every message
    must say what was wrong and, where there is a closed set, which values are valid.
    """


class Diverged(ScalingError):
    """The training loss became NaN or infinite; `scaling train` then exits with `exit_code`."""

    exit_code = 3
