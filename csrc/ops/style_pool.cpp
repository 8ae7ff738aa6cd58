#include "ops/style_pool.h"

#include <ATen/ATen.h>
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

}  // namespace

at::Tensor style_pool_forward(const at::Tensor& x, StylePoolForwardKernel kernel) {
  check_input(x);
  at::Tensor out = at::empty({x.size(0), x.size(1), 2}, x.options());
  if (out.numel() == 0) {
    return out;
  }
  at::Tensor readable;
  const StylePoolLayout layout = readable_layout(x, readable);
  kernel(readable, layout, out);
  return out;
}

at::Tensor style_pool_backward(const at::Tensor& grad, const at::Tensor& x,
                               StylePoolBackwardKernel kernel) {
  check_input(x);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == x.size(0) && grad.size(1) == x.size(1) &&
                  grad.size(2) == 2,
              "style_pool_backward: grad must have shape (", x.size(0), ", ", x.size(1),
              ", 2), got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(),
              "style_pool_backward: grad dtype ", grad.scalar_type(), " differs from x dtype ",
              x.scalar_type());
  // empty_like preserves x's strides, as the fake kernel does.
  at::Tensor dx = at::empty_like(x);
  if (dx.numel() == 0) {
    return dx;
  }
  at::Tensor readable;
  const StylePoolLayout layout = readable_layout(x, readable);
  const at::Tensor grad_c = grad.contiguous();
  if (readable.is_same(x)) {
    kernel(grad_c, readable, layout, dx);
  } else {
    at::Tensor dx_readable = at::empty_like(readable);
    kernel(grad_c, readable, layout, dx_readable);
    dx.copy_(dx_readable);
  }
  return dx;
}

TORCH_LIBRARY_FRAGMENT(fusedset, m) {
  m.def("style_pool(Tensor x) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("style_pool_backward(Tensor grad, Tensor x) -> Tensor", {at::Tag::pt2_compliant_tag});
}

}  // namespace fusedset
