#pragma once
#include "ops/style_pool.h"

namespace fusedset::cuda {

void style_pool_forward_kernel(const at::Tensor& x, StylePoolLayout layout, at::Tensor& out,
                               at::Tensor& stats);
void style_pool_backward_kernel(const at::Tensor& grad, const at::Tensor& x,
                                const at::Tensor& stats, StylePoolLayout layout, at::Tensor& dx);

}  // namespace fusedset::cuda
