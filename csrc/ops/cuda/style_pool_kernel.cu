// style_pool CUDA kernels. One read of x: each thread keeps a Welford state (mean, M2, count),
// and states merge with Chan's formula in a fixed order, so results are deterministic and stay
// exact where sum / sum-of-squares cancels (|mean| >> std). The backward kernel recomputes the
// row statistics in the accumulation type (cheap, the row is being read anyway) rather than
// trusting stats rounded to fp16/bf16, then writes dx in a second sweep over the cached row.
// Lean includes on purpose: the full torch headers cost minutes per architecture under nvcc.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "ops/cuda/style_pool_kernel.h"
#include "ops/style_pool_math.h"

namespace fusedset::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // contiguous layout: one warp per (b, c) row
constexpr int kTileChannels = 32;  // channels_last: 32 adjacent channels per block (coalesced)
constexpr int kTileRows = 8;       // ... and 8 threads down the H*W axis per channel

template <typename acc_t>
struct Welford {
  acc_t mean = 0;
  acc_t m2 = 0;
  acc_t count = 0;

  __device__ void add(acc_t x) {
    count += acc_t(1);
    const acc_t d = x - mean;
    mean += d / count;
    m2 += d * (x - mean);
  }

  __device__ void merge(acc_t o_mean, acc_t o_m2, acc_t o_count) {
    if (o_count == acc_t(0)) {
      return;
    }
    if (count == acc_t(0)) {
      mean = o_mean;
      m2 = o_m2;
      count = o_count;
      return;
    }
    const acc_t total = count + o_count;
    const acc_t d = o_mean - mean;
    mean += d * (o_count / total);
    m2 += o_m2 + d * d * (count * (o_count / total));
    count = total;
  }

};

// The butterfly leaves the same merged state in every lane, in the same order each run.
template <typename acc_t>
__device__ void warp_allreduce(Welford<acc_t>& w) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const acc_t mean = __shfl_xor_sync(0xffffffffu, w.mean, offset);
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, w.m2, offset);
    const acc_t count = __shfl_xor_sync(0xffffffffu, w.count, offset);
    w.merge(mean, m2, count);
  }
}

template <typename scalar_t, typename acc_t, bool kBackward>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
    style_pool_contiguous_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t n,
                      const scalar_t* __restrict__ grad, scalar_t* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= rows) {
    return;  // whole warps leave together, so the shuffles below stay full-warp
  }
  const scalar_t* src = x + row * n;
  Welford<acc_t> w;
  for (int64_t i = lane; i < n; i += kWarp) {
    w.add(static_cast<acc_t>(src[i]));
  }
  warp_allreduce(w);
  const acc_t stdev = unbiased_std(w.m2, n);
  if constexpr (!kBackward) {
    if (lane == 0) {
      out[2 * row] = static_cast<scalar_t>(w.mean);
      out[2 * row + 1] = static_cast<scalar_t>(stdev);
    }
  } else {
    const RowGrad<acc_t> d(static_cast<acc_t>(grad[2 * row]),
                           static_cast<acc_t>(grad[2 * row + 1]), w.mean, stdev, n);
    scalar_t* dst = out + row * n;
    for (int64_t i = lane; i < n; i += kWarp) {
      dst[i] = static_cast<scalar_t>(d(static_cast<acc_t>(src[i])));
    }
  }
}

template <typename scalar_t, typename acc_t, bool kBackward>
__global__ void __launch_bounds__(kTileChannels* kTileRows)
    style_pool_channels_last_kernel(const scalar_t* __restrict__ x, int64_t channels, int64_t n,
                         const scalar_t* __restrict__ grad, scalar_t* __restrict__ out) {
  __shared__ acc_t s_mean[kTileRows][kTileChannels];
  __shared__ acc_t s_m2[kTileRows][kTileChannels];
  __shared__ acc_t s_count[kTileRows][kTileChannels];
  const int tc = threadIdx.x;
  const int tr = threadIdx.y;
  // One flat grid axis over (image, channel tile): gridDim.y would cap the batch at 65535.
  const int64_t tiles = (channels + kTileChannels - 1) / kTileChannels;
  const int64_t b = blockIdx.x / tiles;
  const int64_t c = (blockIdx.x % tiles) * kTileChannels + tc;
  const bool active = c < channels;
  const scalar_t* image = x + b * n * channels;

  Welford<acc_t> w;
  if (active) {
    for (int64_t i = tr; i < n; i += kTileRows) {
      w.add(static_cast<acc_t>(image[i * channels + c]));
    }
  }
  s_mean[tr][tc] = w.mean;
  s_m2[tr][tc] = w.m2;
  s_count[tr][tc] = w.count;
  __syncthreads();
  // Every thread of a channel merges the same states in the same order: no second barrier.
  Welford<acc_t> total;
  for (int r = 0; r < kTileRows; ++r) {
    total.merge(s_mean[r][tc], s_m2[r][tc], s_count[r][tc]);
  }
  if (!active) {
    return;
  }
  const acc_t stdev = unbiased_std(total.m2, n);
  const int64_t row = b * channels + c;
  if constexpr (!kBackward) {
    if (tr == 0) {
      out[2 * row] = static_cast<scalar_t>(total.mean);
      out[2 * row + 1] = static_cast<scalar_t>(stdev);
    }
  } else {
    const RowGrad<acc_t> d(static_cast<acc_t>(grad[2 * row]),
                           static_cast<acc_t>(grad[2 * row + 1]), total.mean, stdev, n);
    scalar_t* dst = out + b * n * channels;
    for (int64_t i = tr; i < n; i += kTileRows) {
      dst[i * channels + c] = static_cast<scalar_t>(d(static_cast<acc_t>(image[i * channels + c])));
    }
  }
}

template <bool kBackward>
void launch(const at::Tensor& x, StylePoolLayout layout, const at::Tensor* grad,
            at::Tensor& out) {
  const int64_t batch = x.size(0);
  const int64_t channels = x.size(1);
  const int64_t n = x.size(2) * x.size(3);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "style_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    const scalar_t* g = kBackward ? grad->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    if (layout == StylePoolLayout::kContiguous) {
      const int64_t rows = batch * channels;
      const dim3 grid(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
      style_pool_contiguous_kernel<scalar_t, acc_t, kBackward>
          <<<grid, kWarp * kRowsPerBlock, 0, stream>>>(src, rows, n, g, dst);
    } else {
      const int64_t tiles = (channels + kTileChannels - 1) / kTileChannels;
      const dim3 grid(static_cast<unsigned>(batch * tiles));
      style_pool_channels_last_kernel<scalar_t, acc_t, kBackward>
          <<<grid, dim3(kTileChannels, kTileRows), 0, stream>>>(src, channels, n, g, dst);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void style_pool_forward_kernel(const at::Tensor& x, StylePoolLayout layout, at::Tensor& out) {
  launch<false>(x, layout, nullptr, out);
}

void style_pool_backward_kernel(const at::Tensor& grad, const at::Tensor& x,
                                StylePoolLayout layout, at::Tensor& dx) {
  launch<true>(x, layout, &grad, dx);
}

}  // namespace fusedset::cuda
