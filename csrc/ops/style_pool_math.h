#pragma once
// Per-row math shared by the CPU and CUDA style_pool kernels.
#include <cmath>
#include <cstdint>
#include <limits>

#ifdef __CUDACC__
#define FUSEDSET_HOST_DEVICE __host__ __device__
#else
#define FUSEDSET_HOST_DEVICE
#endif

namespace fusedset {

// torch.std: divisor n - 1, NaN for fewer than two values.
template <typename acc_t>
FUSEDSET_HOST_DEVICE acc_t unbiased_std(acc_t sum_sq_dev, int64_t n) {
  using std::sqrt;
  return n > 1 ? sqrt(sum_sq_dev / static_cast<acc_t>(n - 1))
               : std::numeric_limits<acc_t>::quiet_NaN();
}

// d(mean, std)/dx = g_mean / n + g_std * (x - mean) / ((n - 1) std). As in torch's std
// backward, a zero std contributes nothing (no 0/0), and so does a zero g_std (std unused).
template <typename acc_t>
struct RowGrad {
  acc_t mean_term = 0;
  acc_t std_scale = 0;
  acc_t mean = 0;

  RowGrad() = default;

  FUSEDSET_HOST_DEVICE RowGrad(acc_t g_mean, acc_t g_std, acc_t mean_, acc_t std, int64_t n)
      : mean_term(g_mean / static_cast<acc_t>(n)),
        std_scale(g_std == acc_t(0) || std == acc_t(0)
                      ? acc_t(0)
                      : g_std / (static_cast<acc_t>(n - 1) * std)),
        mean(mean_) {}

  FUSEDSET_HOST_DEVICE acc_t operator()(acc_t x) const {
    return std_scale == acc_t(0) ? mean_term : with_std(mean_term, std_scale, mean, x);
  }

  // The gradient with its std term, which operator() leaves out where std_scale is 0 (x - mean
  // may be inf or NaN there).
  FUSEDSET_HOST_DEVICE static acc_t with_std(acc_t mean_term, acc_t std_scale, acc_t mean,
                                             acc_t x) {
    return mean_term + std_scale * (x - mean);
  }
};

}  // namespace fusedset
