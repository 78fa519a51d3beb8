"""scaling: image-classification scaling studies in JAX/Flax NNX."""

import os

# XLA:CPU hands convolutions to YNNPACK by default; its weight-gradient convolutions run several
# times slower than XLA's own (Eigen) ones, behind transposes of the whole activation (profiled:
# README "Performance"). This keeps YNNPACK for matrix products and reductions and gives
# convolutions back to XLA: training at batch 128, 32x32, 2 CPU cores went resnet20 199 -> 276
# img/s, wrn16_4 36 -> 77, efficientnet_b0 337 -> 425, with the same losses to float tolerance.
# A setting of the flag in XLA_FLAGS wins. XLA reads XLA_FLAGS once, when JAX starts its first
# backend, so this has no effect if that happened before `import scaling`.
CPU_CONVOLUTION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_flags = os.environ.get("XLA_FLAGS", "")
if CPU_CONVOLUTION_FLAG not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} {CPU_CONVOLUTION_FLAG}=-individual_convolution".strip()


class ScalingError(ValueError):
    """Bad user input (a name, a setting, a path).

    The command line prints the message as one line and exits with status 2, so every message
    must say what was wrong and, where there is a closed set, which values are valid.
    """


class Diverged(ScalingError):
    """The training loss became NaN or infinite; `scaling train` then exits with `exit_code`."""

    exit_code = 3
