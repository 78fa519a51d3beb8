"""scaling: image-classification scaling studies in JAX/Flax NNX."""

import ctypes
import os
import platform

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


def _keep_freed_memory():
    """XLA:CPU allocates each execution's temporary buffer afresh: 319 MB for the CoAtNet of
    `scaling bench`, 300 MB for resnet20. glibc serves allocations above 32 MB with mmap and
    returns them with munmap, so every training step page-faulted its whole working set back in
    (60-79 thousand faults a step, a third of the CPU time spent in the kernel). One malloc
    arena, no mmap and no trimming keep freed memory in the process for the next step (README
    "Performance", change 12). Arenas are per thread, so this must run before JAX starts its
    threads; the price is that a process keeps its peak memory. SCALING_MALLOPT=0 keeps glibc's
    defaults."""
    if os.environ.get("SCALING_MALLOPT", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(m_arena_max, 1)
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, -1)  # -1: never trim


_keep_freed_memory()


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
