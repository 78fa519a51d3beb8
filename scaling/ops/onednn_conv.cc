// oneDNN's float32 convolutions as XLA FFI targets for the CPU: forward, input gradient and
// kernel gradient of an undilated (possibly grouped) convolution of NHWC images with an HWIO
// kernel (Flax's layouts). Built and registered by scaling/ops/onednn.py.
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <oneapi/dnnl/dnnl.hpp>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

enum Kind { kForward, kInputGradient, kKernelGradient };

// One convolution's primitive, built once per shape: building one takes longer than running a
// small one. Its kernel (or kernel gradient) may be in a blocked layout of oneDNN's choosing,
// so `kernel_reorder` converts between that and HWIO, through `kernel_blocked` (allocated once:
// calls take turns).
struct Conv {
  dnnl::primitive primitive;
  memory::desc image, kernel, output, kernel_inner;
  std::optional<dnnl::reorder> kernel_reorder;
  memory kernel_blocked;
  std::string implementation;  // oneDNN's name for the kernel it chose
};

// dims: images (N, H, W, C), kernel (KH, KW, I, O), outputs (N, OH, OW, O) as XLA gives them.
// Called under Convolve's lock.
const Conv& Lookup(Kind kind, ffi::Span<const int64_t> image, ffi::Span<const int64_t> kernel,
                   ffi::Span<const int64_t> output, const memory::dims& strides,
                   const memory::dims& pad_low, const memory::dims& pad_high) {
  static std::map<std::vector<int64_t>, Conv> cache;
  std::vector<int64_t> key = {kind};
  for (auto dims : {image, kernel, output}) key.insert(key.end(), dims.begin(), dims.end());
  for (const auto& v : {strides, pad_low, pad_high}) key.insert(key.end(), v.begin(), v.end());
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;

  Conv conv;
  conv.image = memory::desc({image[0], image[3], image[1], image[2]}, memory::data_type::f32,
                            Tag::nhwc);
  conv.output = memory::desc({output[0], output[3], output[1], output[2]},
                             memory::data_type::f32, Tag::nhwc);
  // A grouped convolution (depthwise: one input channel per group) has fewer kernel inputs than
  // the image has channels. oneDNN sees its kernel as (groups, outputs, inputs, KH, KW), here
  // described by HWIO's strides, whose outputs run group by group.
  int64_t groups = image[3] / kernel[2], group_outputs = kernel[3] / groups;
  int64_t io = kernel[2] * kernel[3];
  memory::dims kernel_dims =
      groups == 1 ? memory::dims{kernel[3], kernel[2], kernel[0], kernel[1]}
                  : memory::dims{groups, group_outputs, kernel[2], kernel[0], kernel[1]};
  conv.kernel = groups == 1 ? memory::desc(kernel_dims, memory::data_type::f32, Tag::hwio)
                            : memory::desc(kernel_dims, memory::data_type::f32,
                                           {group_outputs, 1, kernel[3], kernel[1] * io, io});
  memory::desc any_kernel(kernel_dims, memory::data_type::f32, Tag::any);
  auto direct = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc forward(
      Engine(), dnnl::prop_kind::forward_training, direct, conv.image, any_kernel, conv.output,
      strides, pad_low, pad_high);
  if (kind == kForward) {
    conv.primitive = dnnl::convolution_forward(forward);
    conv.implementation = forward.impl_info_str();
    conv.kernel_inner = forward.weights_desc();
  } else if (kind == kInputGradient) {
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), direct, conv.image, any_kernel,
                                                       conv.output, strides, pad_low, pad_high,
                                                       forward);
    conv.primitive = dnnl::convolution_backward_data(pd);
    conv.implementation = pd.impl_info_str();
    conv.kernel_inner = pd.weights_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(Engine(), direct, conv.image,
                                                          any_kernel, conv.output, strides,
                                                          pad_low, pad_high, forward);
    conv.primitive = dnnl::convolution_backward_weights(pd);
    conv.implementation = pd.impl_info_str();
    conv.kernel_inner = pd.diff_weights_desc();
  }
  if (conv.kernel_inner != conv.kernel) {
    conv.kernel_reorder = kind == kKernelGradient
                              ? dnnl::reorder(dnnl::reorder::primitive_desc(
                                    Engine(), conv.kernel_inner, Engine(), conv.kernel))
                              : dnnl::reorder(dnnl::reorder::primitive_desc(
                                    Engine(), conv.kernel, Engine(), conv.kernel_inner));
    conv.kernel_blocked = memory(conv.kernel_inner, Engine());
  }
  return cache.emplace(key, std::move(conv)).first->second;
}

// An operand as XLA hands it over: its dimensions and its address.
struct Operand {
  ffi::Span<const int64_t> dims;
  void* data;
};

// Looks up (or builds) the primitive and runs it on all cores (an OpenMP team). One call at a
// time: XLA runs independent operations, and each device of a process, on threads of its own,
// and OpenMP teams started from two of them at once hung the process (four CoAtNets trained in
// one program; four host devices).
std::mutex one_at_a_time;

ffi::Error Convolve(Kind kind, Operand image, Operand kernel, Operand output, int64_t sh,
                    int64_t sw, int64_t pt, int64_t pl, int64_t pb, int64_t pr) {
  std::lock_guard<std::mutex> lock(one_at_a_time);
  const Conv& conv =
      Lookup(kind, image.dims, kernel.dims, output.dims, {sh, sw}, {pt, pl}, {pb, pr});
  dnnl::stream stream(Engine());
  memory image_memory(conv.image, Engine(), image.data);
  memory output_memory(conv.output, Engine(), output.data);
  memory kernel_memory(conv.kernel, Engine(), kernel.data);
  memory inner = conv.kernel_reorder ? conv.kernel_blocked : kernel_memory;
  if (conv.kernel_reorder && kind != kKernelGradient) {
    conv.kernel_reorder->execute(stream, kernel_memory, inner);
  }
  int image_arg = kind == kInputGradient ? DNNL_ARG_DIFF_SRC : DNNL_ARG_SRC;
  int kernel_arg = kind == kKernelGradient ? DNNL_ARG_DIFF_WEIGHTS : DNNL_ARG_WEIGHTS;
  int output_arg = kind == kForward ? DNNL_ARG_DST : DNNL_ARG_DIFF_DST;
  conv.primitive.execute(stream, {{image_arg, image_memory},
                                  {kernel_arg, inner},
                                  {output_arg, output_memory}});
  if (conv.kernel_reorder && kind == kKernelGradient) {
    conv.kernel_reorder->execute(stream, inner, kernel_memory);
  }
  stream.wait();
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32, 4>;
using F32Result = ffi::ResultBuffer<ffi::F32, 4>;

Operand In(F32 buffer) { return {buffer.dimensions(), buffer.untyped_data()}; }
Operand Out(F32Result buffer) { return {buffer->dimensions(), buffer->untyped_data()}; }

ffi::Error Forward(F32 image, F32 kernel, F32Result output, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pl, int64_t pb, int64_t pr) {
  return Convolve(kForward, In(image), In(kernel), Out(output), sh, sw, pt, pl, pb, pr);
}

ffi::Error InputGradient(F32 output_gradient, F32 kernel, F32Result image_gradient, int64_t sh,
                         int64_t sw, int64_t pt, int64_t pl, int64_t pb, int64_t pr) {
  return Convolve(kInputGradient, Out(image_gradient), In(kernel), In(output_gradient), sh, sw,
                  pt, pl, pb, pr);
}

ffi::Error KernelGradient(F32 image, F32 output_gradient, F32Result kernel_gradient, int64_t sh,
                          int64_t sw, int64_t pt, int64_t pl, int64_t pb, int64_t pr) {
  return Convolve(kKernelGradient, In(image), Out(kernel_gradient), In(output_gradient), sh, sw,
                  pt, pl, pb, pr);
}

}  // namespace

// The name of the kernel oneDNN runs for a convolution (e.g. "jit_dw:avx512_core"), for the
// models to choose between it and XLA. `dims`: the image's, kernel's and output's four
// dimensions as XLA gives them, then strides (2) and padding (top, left, bottom, right).
extern "C" const char* ScalingConvImplementation(int kind, const int64_t* dims) {
  std::lock_guard<std::mutex> lock(one_at_a_time);
  ffi::Span<const int64_t> image(dims, 4), kernel(dims + 4, 4), output(dims + 8, 4);
  const int64_t* g = dims + 12;
  return Lookup(static_cast<Kind>(kind), image, kernel, output, {g[0], g[1]}, {g[2], g[3]},
                {g[4], g[5]})
      .implementation.c_str();
}

#define SCALING_CONV_BINDING                                                             \
  ffi::Ffi::Bind()                                                                     \
      .Arg<F32>()                                                                      \
      .Arg<F32>()                                                                      \
      .Ret<F32>()                                                                      \
      .Attr<int64_t>("stride_h")                                                       \
      .Attr<int64_t>("stride_w")                                                       \
      .Attr<int64_t>("pad_top")                                                        \
      .Attr<int64_t>("pad_left")                                                       \
      .Attr<int64_t>("pad_bottom")                                                     \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalingConvForward, Forward, SCALING_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalingConvInputGradient, InputGradient, SCALING_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalingConvKernelGradient, KernelGradient, SCALING_CONV_BINDING);
