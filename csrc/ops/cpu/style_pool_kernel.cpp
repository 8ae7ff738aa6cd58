// style_pool CPU kernels. Rows of CAFace's feature maps (784 or 196 values) fit in L1, so each
// row is reduced in two passes over the cached row: mean, then the deviations from it. That
// stays exact where a one-pass sum / sum-of-squares cancels (|mean| >> std). The backward reads
// the row once more, for dx, with the statistics the forward saved.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/cpu/vector_math.h"
#include "ops/lane_sum.h"
#include "ops/style_pool.h"
#include "ops/style_pool_math.h"

namespace fusedset {
namespace {

// Channels reduced together in channels_last rows: a 256-byte slice of each pixel.
constexpr int64_t kChannelBlock = 64;
// Values per parallel task: enough work to pay for handing the task to a thread.
constexpr int64_t kValuesPerTask = 32768;

// shifted_mean is the mean less the row's first value, what the saved statistics hold.
template <typename acc_t>
struct Stats {
  acc_t mean;
  acc_t shifted_mean;
  acc_t std;
};

// Corrected two-pass (Chan, Golub & LeVeque): the sum of the deviations from the first-pass
// mean cancels that mean's rounding error to first order, in the mean and in the variance. The
// correction is added to mean - first, exact where |mean| >> std (both values are close), so the
// shifted mean keeps it where the mean itself would round it away.
template <typename acc_t>
Stats<acc_t> corrected_stats(acc_t first, acc_t mean, acc_t sum_dev, acc_t sum_sq_dev, int64_t n) {
  const acc_t count = static_cast<acc_t>(n);
  const acc_t correction = sum_dev / count;
  return {mean + correction, (mean - first) + correction,
          unbiased_std(sum_sq_dev - sum_dev * sum_dev / count, n)};
}

template <typename scalar_t, typename acc_t>
Stats<acc_t> row_stats(const scalar_t* row, int64_t n) {
  const auto value = [row](int64_t i) { return static_cast<acc_t>(row[i]); };
  const acc_t mean = lane_sum<acc_t>(n, value) / static_cast<acc_t>(n);
  const acc_t sum_dev = lane_sum<acc_t>(n, [&](int64_t i) { return value(i) - mean; });
  const acc_t sum_sq_dev = lane_sum<acc_t>(n, [&](int64_t i) {
    const acc_t d = value(i) - mean;
    return d * d;
  });
  return corrected_stats(n > 0 ? value(0) : acc_t(0), mean, sum_dev, sum_sq_dev, n);
}

// The outputs of one row: out in x's dtype, the saved statistics in acc_t.
template <typename scalar_t, typename acc_t>
void write_stats(const Stats<acc_t>& s, int64_t row, scalar_t* out, acc_t* stats) {
  out[2 * row] = static_cast<scalar_t>(s.mean);
  out[2 * row + 1] = static_cast<scalar_t>(s.std);
  stats[2 * row] = s.shifted_mean;
  stats[2 * row + 1] = s.std;
}

template <typename scalar_t, typename acc_t>
RowGrad<acc_t> row_grad(const scalar_t* grad, const acc_t* stats, int64_t row, int64_t n) {
  return RowGrad<acc_t>(static_cast<acc_t>(grad[2 * row]), static_cast<acc_t>(grad[2 * row + 1]),
                        stats[2 * row], stats[2 * row + 1], n);
}

// Contiguous: each (b, c) row of H*W values is one task.
template <typename Body>
void for_each_row(const at::Tensor& x, const Body& body) {
  const int64_t rows = x.size(0) * x.size(1);
  const int64_t n = x.size(2) * x.size(3);
  const int64_t grain = std::max<int64_t>(1, kValuesPerTask / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      body(r, n);
    }
  });
}

template <typename scalar_t>
void contiguous_forward(const at::Tensor& x, at::Tensor& out, at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  acc_t* stats_data = stats.mutable_data_ptr<acc_t>();
  for_each_row(x, [&](int64_t r, int64_t n) {
    write_stats(row_stats<scalar_t, acc_t>(data + r * n, n), r, out_data, stats_data);
  });
}

// Rows are not empty here: dx has elements.
template <typename scalar_t>
void contiguous_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats,
                         at::Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const acc_t* s = stats.const_data_ptr<acc_t>();
  scalar_t* dst = dx.mutable_data_ptr<scalar_t>();
  for_each_row(x, [&](int64_t r, int64_t n) {
    const scalar_t* row = data + r * n;
    const acc_t first = static_cast<acc_t>(row[0]);
    const RowGrad<acc_t> d = row_grad(g, s, r, n);
    for (int64_t i = 0; i < n; ++i) {
      dst[r * n + i] = static_cast<scalar_t>(d(static_cast<acc_t>(row[i]) - first));
    }
  });
}

// channels_last: per image, an (H*W, C) row-major matrix. A block of channels is reduced down
// the H*W axis with the channel index innermost, so loads stay contiguous and vectorize.
template <typename Body>
void for_each_channel_block(const at::Tensor& x, const Body& body) {
  const int64_t batch = x.size(0);
  const int64_t channels = x.size(1);
  const int64_t n = x.size(2) * x.size(3);
  const int64_t blocks = (channels + kChannelBlock - 1) / kChannelBlock;
  const int64_t grain =
      std::max<int64_t>(1, kValuesPerTask / std::max<int64_t>(n * kChannelBlock, 1));
  at::parallel_for(0, batch * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks;
      const int64_t c0 = (task % blocks) * kChannelBlock;
      body(b, c0, std::min(kChannelBlock, channels - c0), channels, n);
    }
  });
}

template <typename scalar_t, typename acc_t>
void channel_block_stats(const scalar_t* image, int64_t c0, int64_t width, int64_t channels,
                         int64_t n, Stats<acc_t>* stats) {
  acc_t sum[kChannelBlock] = {};
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* px = image + i * channels + c0;
    for (int64_t c = 0; c < width; ++c) {
      sum[c] += static_cast<acc_t>(px[c]);
    }
  }
  acc_t mean[kChannelBlock];
  acc_t sum_dev[kChannelBlock] = {};
  acc_t sum_sq_dev[kChannelBlock] = {};
  for (int64_t c = 0; c < width; ++c) {
    mean[c] = sum[c] / static_cast<acc_t>(n);
  }
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* px = image + i * channels + c0;
    for (int64_t c = 0; c < width; ++c) {
      const acc_t d = static_cast<acc_t>(px[c]) - mean[c];
      sum_dev[c] += d;
      sum_sq_dev[c] += d * d;
    }
  }
  for (int64_t c = 0; c < width; ++c) {
    const acc_t first = n > 0 ? static_cast<acc_t>(image[c0 + c]) : acc_t(0);
    stats[c] = corrected_stats(first, mean[c], sum_dev[c], sum_sq_dev[c], n);
  }
}

template <typename scalar_t>
void channels_last_forward(const at::Tensor& x, at::Tensor& out, at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  acc_t* stats_data = stats.mutable_data_ptr<acc_t>();
  for_each_channel_block(x, [&](int64_t b, int64_t c0, int64_t width, int64_t channels, int64_t n) {
    Stats<acc_t> block[kChannelBlock];
    channel_block_stats(data + b * n * channels, c0, width, channels, n, block);
    for (int64_t c = 0; c < width; ++c) {
      write_stats(block[c], b * channels + c0 + c, out_data, stats_data);
    }
  });
}

// The gradients of one channel block, one array per RowGrad field, so the loop over channels
// reads each as a vector; with_std is all ones where RowGrad adds the std term (std_scale != 0).
template <typename acc_t>
struct ChannelBlockGrad {
  acc_t first[kChannelBlock];
  acc_t mean_term[kChannelBlock];
  acc_t std_scale[kChannelBlock];
  acc_t mean[kChannelBlock];
  BitsOf<acc_t> with_std[kChannelBlock];
};

// dx of one pixel's channel block: RowGrad's operator() with its select made by bits. It adds
// the std term only where std_scale != 0, which in a loop over channels is a conditional
// multiply-add: see select_bits.
template <typename scalar_t, typename acc_t>
void pixel_grad(const ChannelBlockGrad<acc_t>& grads, const scalar_t* __restrict px, int64_t width,
                scalar_t* __restrict out) {
  for (int64_t c = 0; c < width; ++c) {
    const acc_t x = static_cast<acc_t>(px[c]) - grads.first[c];
    const acc_t with_std =
        RowGrad<acc_t>::with_std(grads.mean_term[c], grads.std_scale[c], grads.mean[c], x);
    out[c] = static_cast<scalar_t>(select_bits(grads.with_std[c], with_std, grads.mean_term[c]));
  }
}

template <typename scalar_t>
void channels_last_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats,
                            at::Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const acc_t* s = stats.const_data_ptr<acc_t>();
  scalar_t* dst = dx.mutable_data_ptr<scalar_t>();
  for_each_channel_block(x, [&](int64_t b, int64_t c0, int64_t width, int64_t channels, int64_t n) {
    const scalar_t* image = data + b * n * channels;
    ChannelBlockGrad<acc_t> grads;
    for (int64_t c = 0; c < width; ++c) {
      const RowGrad<acc_t> row = row_grad(g, s, b * channels + c0 + c, n);
      grads.first[c] = static_cast<acc_t>(image[c0 + c]);
      grads.mean_term[c] = row.mean_term;
      grads.std_scale[c] = row.std_scale;
      grads.mean[c] = row.mean;
      grads.with_std[c] = row.std_scale == acc_t(0) ? 0 : ~BitsOf<acc_t>(0);
    }
    scalar_t* out_image = dst + b * n * channels;
    for (int64_t i = 0; i < n; ++i) {
      pixel_grad(grads, image + i * channels + c0, width, out_image + i * channels + c0);
    }
  });
}

void forward_kernel(const at::Tensor& x, StylePoolLayout layout, at::Tensor& out,
                    at::Tensor& stats) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "style_pool_cpu", [&] {
    if (layout == StylePoolLayout::kContiguous) {
      contiguous_forward<scalar_t>(x, out, stats);
    } else {
      channels_last_forward<scalar_t>(x, out, stats);
    }
  });
}

void backward_kernel(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats,
                     StylePoolLayout layout, at::Tensor& dx) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "style_pool_backward_cpu", [&] {
                                    if (layout == StylePoolLayout::kContiguous) {
                                      contiguous_backward<scalar_t>(grad, x, stats, dx);
                                    } else {
                                      channels_last_backward<scalar_t>(grad, x, stats, dx);
                                    }
                                  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedset, CPU, m) {
  m.impl("style_pool", [](const at::Tensor& x) { return style_pool_forward(x, forward_kernel); });
  m.impl("style_pool_backward",
         [](const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats) {
           return style_pool_backward(grad, x, stats, backward_kernel);
         });
}

}  // namespace fusedset
