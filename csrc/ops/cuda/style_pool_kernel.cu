// style_pool CUDA kernels.
//
// Work is cut into units of a row's H*W axis. A unit's values pass through registers in
// chunks; each thread shifts its values by the row's first element (so that every mean below
// is of the order of the std, however large |mean| is), takes an exact two-pass mean and sum
// of squared deviations of its own values, and these moments are combined with Chan's formula
// in a fixed order: across a thread's chunks, across the threads of the unit, then (when a
// row is split into several units so that small batches of large maps fill the GPU) across
// the units' partials in a second kernel. No float atomics: the same input gives the same bits.
// Besides (mean, std) in x's dtype the forward writes the row's statistics in the accumulation
// type, the mean still shifted by the row's first element (see style_pool.h).
//
// Backward: one read of x, in the forward's units: each unit shifts its values by the row's
// first element again and writes dx from the saved statistics.
//
// Lean includes on purpose: the full torch headers cost minutes per architecture under nvcc.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "ops/cuda/style_pool_kernel.h"
#include "ops/style_pool_math.h"

namespace fusedset::cuda {
namespace {

// Launch geometry: every constant the grids and the byte counts depend on.
constexpr int kWarp = 32;
// Contiguous layout: a warp per unit (a row, or a split of one), 8 warps a block. The merge
// kernel uses the same blocks, a warp per row.
constexpr int kWarpsPerBlock = 8;
constexpr int kWarpBlockThreads = kWarp * kWarpsPerBlock;
// channels_last: a block per unit of kTileChannels adjacent channels (a coalesced slice of a
// pixel) and kTileRows threads down the H*W axis.
constexpr int kTileChannels = 32;
constexpr int kTileRows = 8;
constexpr int kTileThreads = kTileChannels * kTileRows;
// 32-bit registers of x values each thread holds: 32 floats or 16 doubles. A chunk is one
// such load per thread: 1024 positions for a warp (fp32/fp16/bf16; 512 for fp64).
constexpr int kValueRegisters = 32;
// Every kernel keeps at least 512 threads resident per SM (at most 128 registers a thread, room
// for the kValueRegisters values a thread holds and its moments).
constexpr int kMinThreadsPerSM = 512;
// Rows are split until the units of a launch hold this many warps (or every unit is one chunk).
constexpr int64_t kTargetWarps = 8192;
constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();

template <typename acc_t>
constexpr int kValuesPerThread = kValueRegisters * 4 / static_cast<int>(sizeof(acc_t));

// Where a unit's result goes; a type each, so that compiled variants read as
// "style_pool_contiguous_kernel<float, float, ToStats>".
struct ToStats {};        // the unit is a whole row: write out and the saved statistics
struct ToPartials {};     // write the unit's shifted (mean, m2) to the workspace
struct GradFromStats {};  // write the unit's dx from the saved statistics

template <typename acc_t>
struct Moments {
  acc_t count = 0;
  acc_t mean = 0;
  acc_t m2 = 0;
};

// Chan et al.'s pairwise update. It rounds differently with a and b swapped: every caller
// passes the earlier part of the row first.
template <typename acc_t>
__device__ Moments<acc_t> combine(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  if (b.count == acc_t(0)) {
    return a;
  }
  if (a.count == acc_t(0)) {
    return b;
  }
  const acc_t total = a.count + b.count;
  const acc_t d = b.mean - a.mean;
  const acc_t w = b.count / total;
  return {total, a.mean + d * w, a.m2 + b.m2 + d * d * (a.count * w)};
}

// Both partners of a butterfly step combine (lower lane, upper lane), so every lane ends with
// bitwise the same state.
template <typename acc_t>
__device__ Moments<acc_t> warp_combine(Moments<acc_t> m, int lane) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const Moments<acc_t> other{__shfl_xor_sync(0xffffffffu, m.count, offset),
                               __shfl_xor_sync(0xffffffffu, m.mean, offset),
                               __shfl_xor_sync(0xffffffffu, m.m2, offset)};
    m = (lane & offset) ? combine(other, m) : combine(m, other);
  }
  return m;
}

// Of the positions first + k * step (k < kPer), those below end: always a prefix of k.
template <int kPer>
__device__ int valid_count(int64_t first, int64_t step, int64_t end) {
  return static_cast<int>(std::clamp<int64_t>((end - first + step - 1) / step, 0, kPer));
}

// v[k] = x at position first + k * step for k < count, else 0. Returns count.
template <int kPer, typename scalar_t, typename acc_t>
__device__ int load_values(const scalar_t* __restrict__ base, int64_t stride, int64_t first,
                           int64_t step, int64_t end, acc_t (&v)[kPer]) {
  const int count = valid_count<kPer>(first, step, end);
  const scalar_t* p = base + first * stride;
  const int64_t jump = step * stride;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    v[k] = k < count ? static_cast<acc_t>(p[k * jump]) : acc_t(0);
  }
  return count;
}

// Only the shifted values stay live: one register per value.
template <int kPer, typename acc_t>
__device__ void shift_values(acc_t (&v)[kPer], int count, acc_t ref) {
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    v[k] = k < count ? v[k] - ref : acc_t(0);
  }
}

template <int kPer, typename scalar_t, typename acc_t>
__device__ void store_grad(scalar_t* __restrict__ base, int64_t stride, int64_t first,
                           int64_t step, int count, const acc_t (&y)[kPer],
                           const RowGrad<acc_t>& d) {
  scalar_t* p = base + first * stride;
  const int64_t jump = step * stride;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    if (k < count) {
      p[k * jump] = static_cast<scalar_t>(d(y[k]));
    }
  }
}

// Two passes over the thread's shifted values (zero past count): exact for so few values.
template <int kPer, typename acc_t>
__device__ Moments<acc_t> thread_moments(const acc_t (&y)[kPer], int count) {
  if (count == 0) {
    return {};
  }
  acc_t sum = 0;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    sum += y[k];
  }
  const acc_t mean = sum / static_cast<acc_t>(count);
  acc_t m2 = 0;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const acc_t d = k < count ? y[k] - mean : acc_t(0);
    m2 += d * d;
  }
  return {static_cast<acc_t>(count), mean, m2};
}

// out in x's dtype, the saved statistics in acc_t. torch's mean over no values is NaN; the
// moments of an empty row have count 0.
template <typename scalar_t, typename acc_t>
__device__ void write_stats(scalar_t* __restrict__ out, acc_t* __restrict__ stats, int64_t row,
                            acc_t ref, acc_t shifted_mean, acc_t m2, int64_t n) {
  const acc_t mean = n > 0 ? shifted_mean : std::numeric_limits<acc_t>::quiet_NaN();
  const acc_t stdev = unbiased_std(m2, n);
  out[2 * row] = static_cast<scalar_t>(ref + mean);
  out[2 * row + 1] = static_cast<scalar_t>(stdev);
  stats[2 * row] = mean;
  stats[2 * row + 1] = stdev;
}

template <typename scalar_t, typename acc_t>
__device__ RowGrad<acc_t> row_grad(const scalar_t* __restrict__ grad,
                                   const acc_t* __restrict__ saved, int64_t row, int64_t n) {
  return RowGrad<acc_t>(static_cast<acc_t>(grad[2 * row]), static_cast<acc_t>(grad[2 * row + 1]),
                        saved[2 * row], saved[2 * row + 1], n);
}

struct Units {
  int64_t splits;  // units per row (contiguous) or per (image, channel tile)
  int64_t span;    // positions per unit, a whole number of chunks
};

// Units of unit_warps warps each over groups rows (or channel tiles) of n positions.
Units plan_units(int64_t groups, int64_t n, int64_t chunk, int64_t unit_warps) {
  const int64_t chunks = std::max<int64_t>(1, (n + chunk - 1) / chunk);
  const int64_t wanted = std::clamp<int64_t>(
      (kTargetWarps + groups * unit_warps - 1) / (groups * unit_warps), 1, chunks);
  const int64_t per_split = (chunks + wanted - 1) / wanted;
  // Recounted so that no split is empty.
  return {(chunks + per_split - 1) / per_split, per_split * chunk};
}

unsigned grid_for(int64_t blocks) {
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, kMaxBlocks));
}

// ---- contiguous: a row is n consecutive values; lane l of a warp reads positions l + 32 k.

template <typename scalar_t, typename acc_t, typename Sink>
__global__ void __launch_bounds__(kWarpBlockThreads, kMinThreadsPerSM / kWarpBlockThreads)
    style_pool_contiguous_kernel(const scalar_t* __restrict__ x, int64_t units, int64_t splits,
                                 int64_t span, int64_t n, const scalar_t* __restrict__ grad,
                                 const acc_t* __restrict__ saved, scalar_t* __restrict__ out,
                                 acc_t* __restrict__ stats, acc_t* __restrict__ partials) {
  constexpr int kPer = kValuesPerThread<acc_t>;
  constexpr int64_t kChunk = int64_t(kWarp) * kPer;
  const int lane = threadIdx.x % kWarp;
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;
  // Loop bounds are the same for all lanes of a warp, so the shuffles stay full-warp.
  for (int64_t unit = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; unit < units;
       unit += stride) {
    const int64_t row = unit / splits;
    const int64_t begin = (unit % splits) * span;
    const int64_t end = std::min(n, begin + span);
    const scalar_t* src = x + row * n;
    acc_t v[kPer];
    if constexpr (std::is_same_v<Sink, GradFromStats>) {
      const acc_t ref =
          __shfl_sync(0xffffffffu, lane == 0 ? static_cast<acc_t>(src[0]) : acc_t(0), 0);
      const RowGrad<acc_t> d = row_grad(grad, saved, row, n);
      for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
        const int count = load_values(src, 1, chunk + lane, kWarp, end, v);
        shift_values(v, count, ref);
        store_grad(out + row * n, 1, chunk + lane, kWarp, count, v, d);
      }
    } else {
      Moments<acc_t> m;
      acc_t ref = 0;
      for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
        const int count = load_values(src, 1, chunk + lane, kWarp, end, v);
        if (chunk == begin) {
          // Lane 0 holds the row's first value when the unit starts the row.
          ref = __shfl_sync(0xffffffffu,
                            lane == 0 && begin != 0 ? static_cast<acc_t>(src[0]) : v[0], 0);
        }
        shift_values(v, count, ref);
        m = combine(m, thread_moments(v, count));
      }
      m = warp_combine(m, lane);
      if (lane == 0) {
        if constexpr (std::is_same_v<Sink, ToStats>) {
          write_stats(out, stats, row, ref, m.mean, m.m2, n);
        } else {
          partials[2 * unit] = m.mean;
          partials[2 * unit + 1] = m.m2;
        }
      }
    }
  }
}

// ---- channels_last: per image an (H*W, C) matrix; a block reads kTileChannels adjacent
// channels (threadIdx.x) of kTileRows positions (threadIdx.y) at a time.

template <typename scalar_t, typename acc_t, typename Sink>
__global__ void __launch_bounds__(kTileThreads, kMinThreadsPerSM / kTileThreads)
    style_pool_channels_last_kernel(const scalar_t* __restrict__ x, int64_t units, int64_t splits,
                                    int64_t span, int64_t n, int64_t channels,
                                    const scalar_t* __restrict__ grad,
                                    const acc_t* __restrict__ saved, scalar_t* __restrict__ out,
                                    acc_t* __restrict__ stats, acc_t* __restrict__ partials) {
  constexpr int kPer = kValuesPerThread<acc_t>;
  constexpr int64_t kChunk = int64_t(kTileRows) * kPer;
  __shared__ acc_t s_count[kTileRows][kTileChannels];
  __shared__ acc_t s_mean[kTileRows][kTileChannels];
  __shared__ acc_t s_m2[kTileRows][kTileChannels];
  __shared__ acc_t s_ref[kTileChannels];
  const int tc = threadIdx.x;
  const int tr = threadIdx.y;
  const int64_t tiles = (channels + kTileChannels - 1) / kTileChannels;
  // One flat grid axis over (image, channel tile, split): gridDim.y would cap B at 65535.
  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const int64_t group = unit / splits;
    const int64_t begin = (unit % splits) * span;
    const int64_t b = group / tiles;
    const int64_t c = (group % tiles) * kTileChannels + tc;
    const bool active = c < channels;
    // Channels past C read no position.
    const int64_t end = active ? std::min(n, begin + span) : begin;
    const int64_t row = b * channels + c;
    const scalar_t* src = x + b * n * channels + c;
    acc_t v[kPer];
    if constexpr (std::is_same_v<Sink, GradFromStats>) {
      // One thread per channel reads its first value.
      if (tr == 0 && active) {
        s_ref[tc] = static_cast<acc_t>(src[0]);
      }
      __syncthreads();
      if (active) {
        const acc_t ref = s_ref[tc];
        const RowGrad<acc_t> d = row_grad(grad, saved, row, n);
        for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
          const int count = load_values(src, channels, chunk + tr, kTileRows, end, v);
          shift_values(v, count, ref);
          store_grad(out + b * n * channels + c, channels, chunk + tr, kTileRows, count, v, d);
        }
      }
    } else {
      int count = load_values(src, channels, begin + tr, kTileRows, end, v);
      if (tr == 0) {
        s_ref[tc] = begin == 0 || !active ? v[0] : static_cast<acc_t>(src[0]);
      }
      __syncthreads();
      const acc_t ref = s_ref[tc];
      shift_values(v, count, ref);
      Moments<acc_t> m = thread_moments(v, count);
      for (int64_t chunk = begin + kChunk; chunk < end; chunk += kChunk) {
        count = load_values(src, channels, chunk + tr, kTileRows, end, v);
        shift_values(v, count, ref);
        m = combine(m, thread_moments(v, count));
      }
      s_count[tr][tc] = m.count;
      s_mean[tr][tc] = m.mean;
      s_m2[tr][tc] = m.m2;
      __syncthreads();
      // Every thread of a channel combines the same states in the same order.
      Moments<acc_t> total;
      for (int r = 0; r < kTileRows; ++r) {
        total = combine(total, Moments<acc_t>{s_count[r][tc], s_mean[r][tc], s_m2[r][tc]});
      }
      if (active && tr == 0) {
        if constexpr (std::is_same_v<Sink, ToStats>) {
          write_stats(out, stats, row, ref, total.mean, total.m2, n);
        } else {
          partials[2 * (row * splits + unit % splits)] = total.mean;
          partials[2 * (row * splits + unit % splits) + 1] = total.m2;
        }
      }
    }
    __syncthreads();  // the next unit reuses the shared arrays
  }
}

// ---- merge: a warp per row combines the row's partials in split order into out and the saved
// statistics.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpBlockThreads)
    style_pool_merge_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t splits,
                            int64_t span, int64_t n, int64_t channels, int64_t channel_stride,
                            const acc_t* __restrict__ partials, scalar_t* __restrict__ out,
                            acc_t* __restrict__ stats) {
  const int lane = threadIdx.x % kWarp;
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; row < rows;
       row += stride) {
    Moments<acc_t> m;
    for (int64_t s = lane; s < splits; s += kWarp) {
      const int64_t count = std::min(n, (s + 1) * span) - s * span;
      m = combine(m, Moments<acc_t>{static_cast<acc_t>(count), partials[2 * (row * splits + s)],
                                    partials[2 * (row * splits + s) + 1]});
    }
    m = warp_combine(m, lane);
    if (lane == 0) {
      const int64_t b = row / channels;
      const acc_t ref =
          static_cast<acc_t>(x[b * channels * n + (row - b * channels) * channel_stride]);
      write_stats(out, stats, row, ref, m.mean, m.m2, n);
    }
  }
}

template <typename scalar_t, typename acc_t>
struct Launcher {
  static constexpr int kPer = kValuesPerThread<acc_t>;

  const at::Tensor& x;
  StylePoolLayout layout;
  int64_t batch = x.size(0);
  int64_t channels = x.size(1);
  int64_t n = x.size(2) * x.size(3);
  int64_t rows = batch * channels;
  int64_t tiles = (channels + kTileChannels - 1) / kTileChannels;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* src = x.const_data_ptr<scalar_t>();

  // The forward and the backward cut x into the same units.
  Units units() const {
    return layout == StylePoolLayout::kContiguous
               ? plan_units(rows, n, int64_t(kWarp) * kPer, 1)
               : plan_units(batch * tiles, n, int64_t(kTileRows) * kPer, kTileThreads / kWarp);
  }

  template <typename Sink>
  void run(const Units& u, const scalar_t* grad, const acc_t* saved, scalar_t* out, acc_t* stats,
           acc_t* partials) const {
    if (layout == StylePoolLayout::kContiguous) {
      const int64_t count = rows * u.splits;
      style_pool_contiguous_kernel<scalar_t, acc_t, Sink>
          <<<grid_for((count + kWarpsPerBlock - 1) / kWarpsPerBlock), kWarpBlockThreads, 0,
             stream>>>(src, count, u.splits, u.span, n, grad, saved, out, stats, partials);
    } else {
      const int64_t count = batch * tiles * u.splits;
      style_pool_channels_last_kernel<scalar_t, acc_t, Sink>
          <<<grid_for(count), dim3(kTileChannels, kTileRows), 0, stream>>>(
              src, count, u.splits, u.span, n, channels, grad, saved, out, stats, partials);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void forward(scalar_t* out, acc_t* stats) const {
    const Units u = units();
    if (u.splits == 1) {
      run<ToStats>(u, nullptr, nullptr, out, stats, nullptr);
      return;
    }
    const at::Tensor partials = x.new_empty(
        {rows * u.splits, 2}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* p = partials.mutable_data_ptr<acc_t>();
    run<ToPartials>(u, nullptr, nullptr, nullptr, nullptr, p);
    const int64_t channel_stride = layout == StylePoolLayout::kContiguous ? n : 1;
    style_pool_merge_kernel<scalar_t, acc_t>
        <<<grid_for((rows + kWarpsPerBlock - 1) / kWarpsPerBlock), kWarpBlockThreads, 0, stream>>>(
            src, rows, u.splits, u.span, n, channels, channel_stride, p, out, stats);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void backward(const scalar_t* grad, const acc_t* saved, scalar_t* dx) const {
    run<GradFromStats>(units(), grad, saved, dx, nullptr, nullptr);
  }
};

}  // namespace

void style_pool_forward_kernel(const at::Tensor& x, StylePoolLayout layout, at::Tensor& out,
                               at::Tensor& stats) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "style_pool_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Launcher<scalar_t, acc_t>{x, layout}.forward(out.mutable_data_ptr<scalar_t>(),
                                                     stats.mutable_data_ptr<acc_t>());
      });
}

void style_pool_backward_kernel(const at::Tensor& grad, const at::Tensor& x,
                                const at::Tensor& stats, StylePoolLayout layout, at::Tensor& dx) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "style_pool_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Launcher<scalar_t, acc_t>{x, layout}.backward(grad.const_data_ptr<scalar_t>(),
                                                      stats.const_data_ptr<acc_t>(),
                                                      dx.mutable_data_ptr<scalar_t>());
      });
}

}  // namespace fusedset::cuda
