#pragma once
// style_pool: per-channel [mean, unbiased std] over H*W of a (B, C, H, W) tensor.
// The shared host half (checks, layout, allocation) lives in style_pool.cpp; each backend
// supplies only the two kernels below.
//
// The forward also returns the statistics the backward needs, in the accumulation type (float32
// for float16/bfloat16/float32, float64 for float64), as aten's native_layer_norm saves its mean
// and rstd: `out` in x's dtype is rounded, and recomputing the statistics would read x again.
// stats[b, c] = [mean - x[b, c, 0, 0], std]: the mean is kept relative to the row's first value
// so that it carries the bits of the deviations x - mean even where |mean| >> std (a mean
// rounded to the accumulation type would shift every deviation by its rounding error).
#include <ATen/core/Tensor.h>

#include <tuple>

namespace fusedset {

// Kernels receive x in one of the two layouts they read in place.
enum class StylePoolLayout { kContiguous, kChannelsLast };

// out: (B, C, 2) contiguous, x's dtype; stats: (B, C, 2) contiguous, the accumulation type.
using StylePoolForwardKernel = void (*)(const at::Tensor& x, StylePoolLayout layout,
                                        at::Tensor& out, at::Tensor& stats);
// grad: (B, C, 2) contiguous, x's dtype; stats: as the forward wrote them; dx: x's shape, dtype
// and layout.
using StylePoolBackwardKernel = void (*)(const at::Tensor& grad, const at::Tensor& x,
                                         const at::Tensor& stats, StylePoolLayout layout,
                                         at::Tensor& dx);

std::tuple<at::Tensor, at::Tensor> style_pool_forward(const at::Tensor& x,
                                                      StylePoolForwardKernel kernel);
at::Tensor style_pool_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats,
                               StylePoolBackwardKernel kernel);

}  // namespace fusedset
