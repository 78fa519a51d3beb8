"""Process-wide settings that make XLA:CPU train faster, applied only when asked.

`configure()` is called by the `scaling` command line (which trains) before JAX starts; a library
user who trains on a CPU calls it first thing, before importing JAX. Reading results, or a
TPU host feeding data, never needs it. Both settings were measured on a 2-core AMD EPYC at batch
128, 32x32 (docs/performance.md):

- XLA:CPU hands convolutions to YNNPACK by default, whose weight-gradient convolutions run
  several times slower than XLA's own (Eigen) ones, behind transposes of the whole activation.
  The flag below keeps YNNPACK for matrix products and reductions and gives convolutions back to
  XLA: training went resnet20 199 -> 276 img/s, wrn16_4 36 -> 77, efficientnet_b0 337 -> 425,
  with the same losses to float tolerance. A setting of the flag in XLA_FLAGS wins; XLA reads
  XLA_FLAGS once, when JAX starts its first backend, so this has no effect after that.
- XLA:CPU allocates each execution's temporary buffer afresh (319 MB for the CoAtNet of
  `scaling bench`, 300 MB for resnet20). glibc serves allocations above 32 MB with mmap and
  returns them with munmap, so every training step page-faulted its working set back in (60-79
  thousand faults a step, a third of the CPU time in the kernel). One malloc arena, no mmap and
  no trimming keep freed memory in the process for the next step; the price is that the process
  keeps its peak memory. Arenas are per thread, so this must run before JAX starts its threads.
  SCALING_MALLOPT=0 keeps glibc's defaults.
"""

import ctypes
import os
import platform

CONVOLUTION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CONVOLUTION_SETTING = f"{CONVOLUTION_FLAG}=-individual_convolution"


def configure():
    """Apply both settings to this process (idempotent)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if CONVOLUTION_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CONVOLUTION_SETTING}".strip()
    keep_freed_memory()


def keep_freed_memory():
    if os.environ.get("SCALING_MALLOPT", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(m_arena_max, 1)
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, -1)  # -1: never trim
