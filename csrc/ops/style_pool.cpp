#include "ops/style_pool.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

namespace fusedset {
namespace {

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "style_pool: x must have shape (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "style_pool: x must be float16, bfloat16, float32 or float64, got ",
              x.scalar_type());
}

// The kernels read contiguous and channels_last tensors in place; other strides are copied once.
StylePoolLayout readable_layout(const at::Tensor& x, at::Tensor& readable) {
  if (x.is_contiguous()) {
    readable = x;
    return StylePoolLayout::kContiguous;
  }
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    readable = x;
    return StylePoolLayout::kChannelsLast;
  }
  readable = x.contiguous();
  return StylePoolLayout::kContiguous;
}

// grad and stats are (B, C, 2) per-row tensors on x's device.
void check_row_tensor(const at::Tensor& x, const at::Tensor& t, const char* name,
                      at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == x.size(0) && t.size(1) == x.size(1) && t.size(2) == 2,
              "style_pool_backward: ", name, " must have shape (", x.size(0), ", ", x.size(1),
              ", 2), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "style_pool_backward: ", name, " must have dtype ", dtype,
              " (x is ", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "style_pool_backward: ", name, " must be on x's device ",
              x.device(), ", got ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> style_pool_forward(const at::Tensor& x,
                                                      StylePoolForwardKernel kernel) {
  check_input(x);
  at::Tensor out = at::empty({x.size(0), x.size(1), 2}, x.options());
  at::Tensor stats = at::empty_like(out, out.options().dtype(at::toOpMathType(x.scalar_type())));
  if (out.numel() == 0) {
    return {out, stats};
  }
  at::Tensor readable;
  const StylePoolLayout layout = readable_layout(x, readable);
  kernel(readable, layout, out, stats);
  return {out, stats};
}

at::Tensor style_pool_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats,
                               StylePoolBackwardKernel kernel) {
  check_input(x);
  check_row_tensor(x, grad, "grad", x.scalar_type());
  check_row_tensor(x, stats, "stats", at::toOpMathType(x.scalar_type()));
  // empty_like preserves x's strides, as the fake kernel does.
  at::Tensor dx = at::empty_like(x);
  if (dx.numel() == 0) {
    return dx;
  }
  at::Tensor readable;
  const StylePoolLayout layout = readable_layout(x, readable);
  const at::Tensor grad_c = grad.contiguous();
  const at::Tensor stats_c = stats.contiguous();
  if (readable.is_same(x)) {
    kernel(grad_c, readable, stats_c, layout, dx);
  } else {
    at::Tensor dx_readable = at::empty_like(readable);
    kernel(grad_c, readable, stats_c, layout, dx_readable);
    dx.copy_(dx_readable);
  }
  return dx;
}

TORCH_LIBRARY_FRAGMENT(fusedset, m) {
  // Returns (out, stats); stats (see style_pool.h) is what style_pool_backward takes.
  m.def("style_pool(Tensor x) -> (Tensor, Tensor)", {at::Tag::pt2_compliant_tag});
  m.def("style_pool_backward(Tensor grad, Tensor x, Tensor stats) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

}  // namespace fusedset
