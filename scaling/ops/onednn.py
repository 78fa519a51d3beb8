"""oneDNN's convolutions on CPU, the kernels PyTorch trains with there, called from XLA.

XLA:CPU's own (Eigen) convolutions run 1.2-4x slower than oneDNN's at CIFAR widths, their
gradients most (32x32x16 at batch 128: forward 4.5 -> 3.1 ms, both gradients 17.3 -> 4.2), and
this jaxlib's oneDNN flags do not reach convolutions. So `conv` runs an NHWC float32 convolution
(grouped too: depthwise ones have oneDNN kernels of their own) and its two gradients as XLA FFI
custom calls into oneDNN (`onednn_conv.cc`), one call at a time, each on all cores (an OpenMP
team; set OMP_NUM_THREADS for fewer). `forward`, `input_gradient` and `kernel_gradient` are the
three calls apart, and `implementation` names the kernel oneDNN picked for one of them, for a
model to choose between oneDNN and XLA per shape.

oneDNN comes from the `cpu` extra (Intel's `onednn-cpu-gomp` wheels, headers included); the
calls are compiled on first use with the system's C++ compiler, once per source and jaxlib
version, into `decode.cache_directory()` ($SCALING_CACHE_DIR, default ~/.cache/scaling). Without
oneDNN or a compiler, or with SCALING_ONEDNN=0, `available()` is False and models use XLA's
convolutions.

A batch sharded over several devices stays sharded (`custom_partitioning`): each device
convolves its own examples, and the kernel gradient is summed over them with `psum`.
"""

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jaxlib
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scaling import ScalingError, decode
from scaling.ops import backend

SOURCE = Path(__file__).with_name("onednn_conv.cc")
TARGETS = {  # FFI target -> symbol in the compiled library
    "scaling_conv_forward": "ScalingConvForward",
    "scaling_conv_input_gradient": "ScalingConvInputGradient",
    "scaling_conv_kernel_gradient": "ScalingConvKernelGradient",
}
_state = {"disabled": False}


def _build(prefix: Path) -> Path:
    """The compiled library for this source, jaxlib and oneDNN, built if not cached. Built in a
    temporary file and renamed, so processes building at once never load a partial one."""
    key = hashlib.sha256(
        SOURCE.read_bytes() + jaxlib.__version__.encode() + str(prefix).encode()
    ).hexdigest()[:16]
    library = decode.cache_directory() / f"onednn_conv-{key}.so"
    if library.exists():
        return library
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        command = [
            os.environ.get("CXX", "c++"),
            *("-O2", "-std=c++17", "-shared", "-fPIC", "-w"),
            f"-I{jax.ffi.include_dir()}",
            f"-I{prefix / 'include'}",
            str(SOURCE),
            "-o",
            str(built),
            f"-L{prefix / 'lib'}",
            "-ldnnl",
            f"-Wl,-rpath,{prefix / 'lib'}",
        ]
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(built, library)
    return library


@functools.cache
def _library():
    """The loaded library with its calls registered with XLA (built on first call), or None."""
    if os.environ.get("SCALING_ONEDNN", "1") == "0" or backend() != "cpu":
        return None
    prefix = Path(sys.prefix)
    if not (prefix / "include/oneapi/dnnl/dnnl.hpp").exists():
        return None  # the `cpu` extra is not installed
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        logging.warning("scaling: no C++ compiler, so XLA's convolutions run instead of oneDNN's")
        return None
    try:
        library = _build(prefix)
    except subprocess.CalledProcessError as error:
        first = (error.stderr or "").strip().splitlines()[:1]
        logging.warning("scaling: building oneDNN's convolutions failed (%s)", first)
        return None
    handle = ctypes.cdll.LoadLibrary(str(library))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)), "cpu")
    handle.ScalingConvImplementation.restype = ctypes.c_char_p
    return handle


def available() -> bool:
    """Whether oneDNN's convolutions are registered with XLA (built on first call)."""
    return _library() is not None


def enabled() -> bool:
    """Whether convolutions traced now go to oneDNN."""
    return not _state["disabled"] and available()


@contextlib.contextmanager
def disabled():
    """Convolutions traced within it are XLA's: for XLA's cost analysis, which counts a custom
    call as free, and to compare the two."""
    before, _state["disabled"] = _state["disabled"], True
    try:
        yield
    finally:
        _state["disabled"] = before


def _ffi(target, shape, a, b, geometry):
    (stride_h, stride_w), ((top, bottom), (left, right)) = geometry
    names = ("stride_h", "stride_w", "pad_top", "pad_left", "pad_bottom", "pad_right")
    values = (stride_h, stride_w, top, left, bottom, right)
    attributes = {name: np.int64(value) for name, value in zip(names, values, strict=True)}
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, a.dtype))(a, b, **attributes)


@functools.partial(custom_partitioning, static_argnums=(2, 3, 4))
def _call(a, b, target, shape, geometry):
    """`a` carries the batch first (images or output gradients); `b` is the kernel, or the
    output gradient for the kernel gradient."""
    return _ffi(target, shape, a, b, geometry)


def _batch_axes(arg_shapes):
    spec = arg_shapes[0].sharding.spec
    return spec[0] if len(spec) else None


def _partition(target, shape, geometry, mesh, arg_shapes, result_shape):
    batch = _batch_axes(arg_shapes)
    summed = target == "scaling_conv_kernel_gradient"

    def lower(a, b):
        local = shape if summed else (a.shape[0], *shape[1:])
        out = _ffi(target, local, a, b, geometry)
        return jax.lax.psum(out, batch) if summed and batch is not None else out

    batched = NamedSharding(mesh, P(batch))
    whole = NamedSharding(mesh, P())
    b_sharding = batched if summed else whole
    return mesh, lower, whole if summed else batched, (batched, b_sharding)


def _infer(target, shape, geometry, mesh, arg_shapes, result_shape):
    if target == "scaling_conv_kernel_gradient":
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(_batch_axes(arg_shapes)))


def _rule(target, shape, geometry, mesh, arg_shapes, result_shape):
    """Only the batch may be sharded: every other dimension is marked for replication."""
    operands, result = {
        "scaling_conv_forward": ("n h w c, k l i o", "n p q o"),
        "scaling_conv_input_gradient": ("n p q o, k l i o", "n h w c"),
        "scaling_conv_kernel_gradient": ("n h w c, n p q o", "k l i o"),
    }[target]
    factors = dict.fromkeys(f"{operands} {result}".replace(",", " ").split())  # in order
    settings = {"need_replication_factors": tuple(f for f in factors if f != "n")}
    if "n" not in result:
        settings["reduction_factors"] = ("n",)
    return f"{operands} -> {result}", settings


_call.def_partition(partition=_partition, infer_sharding_from_operands=_infer, sharding_rule=_rule)


def _output_shape(x_shape, kernel_shape, strides, padding):
    (n, h, w, _), (kh, kw, _, features) = x_shape, kernel_shape
    out_h = (h + sum(padding[0]) - kh) // strides[0] + 1
    out_w = (w + sum(padding[1]) - kw) // strides[1] + 1
    return (n, out_h, out_w, features)


def implementation(target, x_shape, kernel_shape, strides, padding) -> str:
    """oneDNN's name for the kernel that runs `target` on these shapes, e.g. 'jit_dw:avx512_core'
    (a kernel for depthwise convolutions)."""
    (top, bottom), (left, right) = padding
    dims = (*x_shape, *kernel_shape, *_output_shape(x_shape, kernel_shape, strides, padding),
            *strides, top, left, bottom, right)  # fmt: skip
    kind = list(TARGETS).index(target)  # the order of onednn_conv.cc's `Kind`
    return _library().ScalingConvImplementation(kind, (ctypes.c_int64 * 18)(*dims)).decode()


def forward(x, kernel, strides, padding):
    """NHWC `x` convolved with an HWIO `kernel` (float32, undilated; grouped when the kernel has
    fewer inputs than `x` has channels) by oneDNN; `padding` is ((top, bottom), (left, right))."""
    if not available():  # registers the calls with XLA on first use
        raise ScalingError("oneDNN's convolutions are unavailable (see scaling.ops.onednn)")
    shape = _output_shape(x.shape, kernel.shape, strides, padding)
    return _call(x, kernel, "scaling_conv_forward", shape, (strides, padding))


def input_gradient(dy, kernel, x_shape, strides, padding):
    return _call(dy, kernel, "scaling_conv_input_gradient", x_shape, (strides, padding))


def kernel_gradient(x, dy, kernel_shape, strides, padding):
    return _call(x, dy, "scaling_conv_kernel_gradient", kernel_shape, (strides, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x, kernel, strides, padding):
    """`forward` with oneDNN's gradients."""
    return forward(x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
    return forward(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    dx = input_gradient(dy, kernel, x.shape, strides, padding)
    return dx, kernel_gradient(x, dy, kernel.shape, strides, padding)


conv.defvjp(_conv_fwd, _conv_bwd)
