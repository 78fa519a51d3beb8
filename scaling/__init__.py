"""scaling: image-classification scaling studies in JAX/Flax NNX.

Importing it changes nothing in the process; `scaling.ops.cpu.configure()` opts into the CPU
settings the command line applies.
"""


class ScalingError(ValueError):
    """Bad user input (a name, a setting, a path).

    The command line prints the message as one line and exits with status 2, so every message
    must say what was wrong and, where there is a closed set, which values are valid.
    """


class Diverged(ScalingError):
    """The training loss became NaN or infinite; `scaling train` then exits with `exit_code`."""

    exit_code = 3


class Stopped(Exception):  # noqa: N818 (a state, not a fault)
    """Training stopped on SIGTERM or Ctrl-C after writing a checkpoint: resumable. `scaling
    train` then exits with `exit_code` (EX_TEMPFAIL), which a sweep reads as "still pending"."""

    exit_code = 75
