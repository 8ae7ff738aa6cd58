#pragma once
// style_pool: per-channel [mean, unbiased std] over H*W of a (B, C, H, W) tensor.
// The shared host half (checks, layout, allocation) lives in style_pool.cpp; each backend
// supplies only the two kernels below.
#include <ATen/core/Tensor.h>

namespace fusedset {

// Kernels receive x in one of the two layouts they read in place.
enum class StylePoolLayout { kContiguous, kChannelsLast };

// out: (B, C, 2) contiguous, x's dtype.
using StylePoolForwardKernel = void (*)(const at::Tensor& x, StylePoolLayout layout,
                                        at::Tensor& out);
// grad: (B, C, 2) contiguous; dx: x's shape, dtype and layout.
using StylePoolBackwardKernel = void (*)(const at::Tensor& grad, const at::Tensor& x,
                                         StylePoolLayout layout, at::Tensor& dx);

at::Tensor style_pool_forward(const at::Tensor& x, StylePoolForwardKernel kernel);
at::Tensor style_pool_backward(const at::Tensor& grad, const at::Tensor& x,
                               StylePoolBackwardKernel kernel);

}  // namespace fusedset
