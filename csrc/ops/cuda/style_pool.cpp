#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/cuda/style_pool_kernel.h"

namespace fusedset {

TORCH_LIBRARY_IMPL(fusedset, CUDA, m) {
  m.impl("style_pool", [](const at::Tensor& x) {
    const c10::cuda::CUDAGuard guard(x.device());
    return style_pool_forward(x, cuda::style_pool_forward_kernel);
  });
  m.impl("style_pool_backward",
         [](const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats) {
           const c10::cuda::CUDAGuard guard(x.device());
           return style_pool_backward(grad, x, stats, cuda::style_pool_backward_kernel);
         });
}

}  // namespace fusedset
