// sinusoid_attention_pool CPU kernel: one pass over the rows. Each task owns a range of one
// template's rows and walks it in blocks of kBlock; per block, the key scores of the rows, the
// sinusoidal codes of their positions and the codes' scores (two matrix products), an online
// softmax update and the weighted sum of the rows (a third product) all happen while the
// block sits in L2. No (N, C) code nor (N, R) score exists outside a block. Per-task partial
// states (running max, sum and weighted sum) are merged in task order, so the result depends on
// the shapes only, never on the thread count or schedule.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops/cpu/dynamic_tasks.h"
#include "ops/cpu/vector_math.h"
#include "ops/lane_sum.h"
#include "ops/sinusoid_attention_pool.h"

namespace fusedset {
namespace {

// Rows per block: the block's rows (kBlock x C) and codes (kBlock x D) stay in L2 (1 MB here)
// across the three products that read them. 32 to 128 rows ran within 4% of each other at
// N = 1e5, C = D = 512 (64 the fastest), 192 rows 5% slower.
constexpr int64_t kBlock = 64;
// A task is at least kMinTaskRows rows and a template has at most kMaxTasks of them: enough
// tasks to keep the cores busy at B = 1, partial states whose number does not grow with N.
constexpr int64_t kMinTaskRows = 1024;
constexpr int64_t kMaxTasks = 64;

struct Tasks {
  int64_t count;
  int64_t size;

  explicit Tasks(int64_t n) {
    const int64_t wanted =
        std::clamp<int64_t>((n + kMinTaskRows - 1) / kMinTaskRows, 1, kMaxTasks);
    size = (n + wanted - 1) / wanted;
    count = (n + size - 1) / size;
  }
};

// The right-hand side of the products, as column panels: panel p holds columns
// [p kPanel, p kPanel + width) of a (K x padded) matrix as a (K x width) row-major block, width
// a multiple of 8. A product then broadcasts one value of its left matrix against a contiguous
// run of the panel: no horizontal sums, no repacking per call (MKL's per-call packing was a
// third of its time on these shapes, measured with perf). One panel is the plain row-major
// (K x padded) matrix when padded <= kPanel.
constexpr int64_t kPanel = 32;

// Padded widths of panels: R rounded up to a multiple of 8, so that rows have no scalar tail.
inline int64_t padded_width(int64_t r) {
  return (r + 7) / 8 * 8;
}

// b (R x K) row-major, transposed into panels of a (K x padded) matrix, zero past column R.
template <typename T>
std::vector<T> pack_transposed(const T* b, int64_t r, int64_t k) {
  const int64_t padded = padded_width(r);
  std::vector<T> panels(k * padded, T(0));
  for (int64_t p0 = 0; p0 < padded; p0 += kPanel) {
    const int64_t width = std::min(kPanel, padded - p0);
    T* panel = panels.data() + p0 * k;
    for (int64_t j = p0; j < std::min(r, p0 + width); ++j) {
      for (int64_t c = 0; c < k; ++c) {
        panel[c * width + (j - p0)] = b[j * k + c];
      }
    }
  }
  return panels;
}

// MR rows of out (row stride ldo, NR columns) = (or += with kAccumulate) MR rows of a times a
// (k x NR) panel with rows panel_stride apart, element (row, t) of a at
// a[row * row_stride + t * k_stride]: MR x NR accumulators stay in registers and each panel
// row loaded serves MR rows.
template <typename T, int MR, int NR, bool kAccumulate>
FUSEDSET_VECTOR_CLONES void multiply_tile(const T* __restrict a, int64_t row_stride,
                                          int64_t k_stride, int64_t k, const T* __restrict panel,
                                          int64_t panel_stride, T* __restrict out, int64_t ldo) {
  T acc[MR][NR];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      acc[i][j] = kAccumulate ? out[i * ldo + j] : T(0);
    }
  }
  for (int64_t t = 0; t < k; ++t) {
    const T* pt = panel + t * panel_stride;
    for (int i = 0; i < MR; ++i) {
      const T v = a[i * row_stride + t * k_stride];
      for (int j = 0; j < NR; ++j) {
        acc[i][j] += v * pt[j];
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      out[i * ldo + j] = acc[i][j];
    }
  }
}

// Eight rows per tile fill AVX-512's 32 registers (16 accumulators at NR = 24 or 32) and ran
// 1.17x faster than four (116 against 99 GFLOP/s on one core, in cache); AVX2 has 16 registers
// and takes four.
inline bool wide_registers() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512;
#else
  return false;
#endif
}

template <typename T, int NR, bool kAccumulate>
void multiply_rows(const T* a, int64_t row_stride, int64_t k_stride, int64_t m, int64_t k,
                   const T* panel, int64_t panel_stride, T* out, int64_t ldo) {
  int64_t i = 0;
  if (wide_registers()) {
    for (; i + 8 <= m; i += 8) {
      multiply_tile<T, 8, NR, kAccumulate>(a + i * row_stride, row_stride, k_stride, k, panel,
                                           panel_stride, out + i * ldo, ldo);
    }
  }
  for (; i + 4 <= m; i += 4) {
    multiply_tile<T, 4, NR, kAccumulate>(a + i * row_stride, row_stride, k_stride, k, panel,
                                         panel_stride, out + i * ldo, ldo);
  }
  for (; i < m; ++i) {
    multiply_tile<T, 1, NR, kAccumulate>(a + i * row_stride, row_stride, k_stride, k, panel,
                                         panel_stride, out + i * ldo, ldo);
  }
}

// out (m x padded, row-major) = (or += with kAccumulate) a (m x k) times the panels of a
// (k x padded) matrix; element (row, t) of a at a[row * row_stride + t].
template <typename T, bool kAccumulate>
void multiply(const T* a, int64_t row_stride, int64_t m, int64_t k, const T* panels,
              int64_t padded, T* out) {
  for (int64_t p0 = 0; p0 < padded; p0 += kPanel) {
    const T* panel = panels + p0 * k;
    T* dst = out + p0;
    switch (std::min(kPanel, padded - p0)) {
      case 8:
        multiply_rows<T, 8, kAccumulate>(a, row_stride, 1, m, k, panel, 8, dst, padded);
        break;
      case 16:
        multiply_rows<T, 16, kAccumulate>(a, row_stride, 1, m, k, panel, 16, dst, padded);
        break;
      case 24:
        multiply_rows<T, 24, kAccumulate>(a, row_stride, 1, m, k, panel, 24, dst, padded);
        break;
      default:
        multiply_rows<T, 32, kAccumulate>(a, row_stride, 1, m, k, panel, 32, dst, padded);
        break;
    }
  }
}

// acc (padded x width) += w^T x for the weights w (count x padded) and a block's rows x
// (count x width): the weighted sums of the rows, for every query. Tiles of 8 (AVX2: 4) queries
// by 32 columns: a strip of 32 columns of the block serves every query from L1.
template <typename T>
void accumulate_weighted(const T* w, int64_t padded, const T* x, int64_t count, int64_t width,
                         T* acc) {
  int64_t c0 = 0;
  for (; c0 + 32 <= width; c0 += 32) {
    multiply_rows<T, 32, true>(w, 1, padded, padded, count, x + c0, width, acc + c0, width);
  }
  for (; c0 + 8 <= width; c0 += 8) {
    multiply_rows<T, 8, true>(w, 1, padded, padded, count, x + c0, width, acc + c0, width);
  }
  for (; c0 < width; ++c0) {
    multiply_rows<T, 1, true>(w, 1, padded, padded, count, x + c0, width, acc + c0, width);
  }
}

// sin and cos of phase / divisors[k] for the half channel pairs, sines then cosines; returns
// the sum of all of them.
FUSEDSET_VECTOR_CLONES float sincos_row(float phase, const float* __restrict divisors,
                                        int64_t half, float* __restrict sines,
                                        float* __restrict cosines) {
  float part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= half; k += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      sincos_reduced(phase / divisors[k + l], sines[k + l], cosines[k + l]);
      part[l] += sines[k + l] + cosines[k + l];
    }
  }
  float total = 0;
  for (; k < half; ++k) {
    sincos_reduced(phase / divisors[k], sines[k], cosines[k]);
    total += sines[k] + cosines[k];
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    total += part[l];
  }
  return total;
}

template <typename acc_t>
acc_t sincos_row_exact(acc_t phase, const acc_t* divisors, int64_t half, acc_t* sines,
                       acc_t* cosines) {
  acc_t total = 0;
  for (int64_t k = 0; k < half; ++k) {
    const acc_t angle = phase / divisors[k];
    sines[k] = std::sin(angle);
    cosines[k] = std::cos(angle);
    total += sines[k] + cosines[k];
  }
  return total;
}

// The sinusoidal code of each position of a block over the first `pairs` channel pairs, codes
// (count x 2 pairs) as [sines | cosines], and sums[i], the sum of the code's channels.
template <typename acc_t>
void sinusoid_codes(const acc_t* positions, int64_t count, acc_t position_scale,
                    const acc_t* divisors, int64_t pairs, acc_t largest_inverse_divisor,
                    acc_t* codes, acc_t* sums) {
  for (int64_t i = 0; i < count; ++i) {
    const acc_t phase = positions[i] * position_scale;
    acc_t* sines = codes + i * 2 * pairs;
    acc_t* cosines = sines + pairs;
    if constexpr (std::is_same_v<acc_t, float>) {
      sums[i] = std::abs(phase) * largest_inverse_divisor <= kSincosMaxAngle
                    ? sincos_row(phase, divisors, pairs, sines, cosines)
                    : sincos_row_exact(phase, divisors, pairs, sines, cosines);
    } else {
      sums[i] = sincos_row_exact(phase, divisors, pairs, sines, cosines);
    }
  }
}

// Channel pairs whose angle stays within kSeriesAngle for every row of the call are summed as
// power series instead: with t = phase / (largest |phase|) and ratio_k = (largest |phase|) / d_k,
// sin(t ratio_k) and cos(t ratio_k) are polynomials in t, so the scores of all those pairs are
// one polynomial per query, sum_p H_rp t^p, with H summed over the pairs once per call (in
// double). At FaceCoresetNet's norms (5 to 40, angles up to 251) that is 122 of 256 pairs
// replaced by 16 powers: no sines, cosines nor product terms for them. Terms up to t^15 leave
// a truncation below 3.1e-9 per channel at |angle| <= 2 (2^16 / 16!), under the float
// rounding of the sines themselves. Float only (float64 keeps every sine), and only when the
// caller allows it (p.series): autograd calls keep every sine as torch forms it, so that the
// forward matches the one its backward recomputes.
constexpr double kSeriesAngle = 2.0;
constexpr int64_t kSeriesTerms = 16;

template <typename acc_t>
struct Series {
  int64_t first_pair;  // pairs [first_pair, half) are summed as series; none when == half
  acc_t inverse_phase;  // 1 / largest |phase| (0 when every phase is 0)
  std::vector<std::vector<acc_t>> queries;  // per template: panels of H^T (kSeriesTerms x padded)
  std::vector<acc_t> sums;  // the series of the channels' sum (for the LayerNorm's mean)
};

// The series of problem p: the pairs it covers, and the coefficients of every query's scores
// and of the channels' sum. code_queries (B, R, D) is reordered [sines | cosines].
template <typename acc_t>
Series<acc_t> make_series(const SinusoidPoolProblem& p, const acc_t* code_queries) {
  const int64_t batch = p.batch();
  const int64_t half = p.divisors.size(0);
  const int64_t r = p.num_queries();
  Series<acc_t> series{half, 0, {}, {}};
  if (!std::is_same_v<acc_t, float> || !p.series) {
    return series;
  }
  const acc_t* positions = p.positions.const_data_ptr<acc_t>();
  const int64_t* lengths = p.lengths.const_data_ptr<int64_t>();
  double largest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < lengths[b]; ++i) {
      const double phase = positions[b * p.rows() + i] * static_cast<acc_t>(p.position_scale);
      largest = std::max(largest, std::abs(phase));
    }
  }
  const acc_t* divisors = p.divisors.const_data_ptr<acc_t>();
  int64_t first = half;
  while (first > 0 && std::isfinite(largest) &&
         largest <= kSeriesAngle * std::abs(static_cast<double>(divisors[first - 1]))) {
    --first;
  }
  // Too few pairs to pay for the powers: every pair exact.
  if (half - first < kSeriesTerms) {
    return series;
  }
  series.first_pair = first;
  series.inverse_phase = largest > 0 ? static_cast<acc_t>(1 / largest) : acc_t(0);
  // term[k][t] = +-ratio_k^t / t!, the coefficient of t^t in sin (t odd) or cos (t even).
  std::vector<double> terms((half - first) * kSeriesTerms);
  for (int64_t k = first; k < half; ++k) {
    const double ratio = largest / static_cast<double>(divisors[k]);
    double term = 1;
    for (int64_t t = 0; t < kSeriesTerms; ++t) {
      terms[(k - first) * kSeriesTerms + t] = (t / 2) % 2 == 0 ? term : -term;
      term *= ratio / static_cast<double>(t + 1);
    }
  }
  series.sums.assign(kSeriesTerms, acc_t(0));
  std::vector<double> total(kSeriesTerms, 0.0);
  for (int64_t k = first; k < half; ++k) {
    for (int64_t t = 0; t < kSeriesTerms; ++t) {
      total[t] += terms[(k - first) * kSeriesTerms + t];
    }
  }
  std::copy(total.begin(), total.end(), series.sums.begin());
  std::vector<acc_t> coefficients(r * kSeriesTerms);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < r; ++j) {
      const acc_t* g = code_queries + (b * r + j) * 2 * half;
      for (int64_t t = 0; t < kSeriesTerms; ++t) {
        // Odd powers come from the sines (g[k]), even ones from the cosines (g[half + k]).
        const acc_t* weights = g + (t % 2 == 1 ? 0 : half);
        double sum = 0;
        for (int64_t k = first; k < half; ++k) {
          sum += static_cast<double>(weights[k]) * terms[(k - first) * kSeriesTerms + t];
        }
        coefficients[j * kSeriesTerms + t] = static_cast<acc_t>(sum);
      }
    }
    series.queries.push_back(pack_transposed(coefficients.data(), r, kSeriesTerms));
  }
  return series;
}

// Powers t^0 .. t^(kSeriesTerms - 1) of t = phase * inverse_phase for each row of a block
// (count x kSeriesTerms); sums[i] += the series of the row's channel sum.
template <typename acc_t>
void series_powers(const acc_t* positions, int64_t count, acc_t position_scale,
                   const Series<acc_t>& series, acc_t* powers, acc_t* sums) {
  for (int64_t i = 0; i < count; ++i) {
    const acc_t t = positions[i] * position_scale * series.inverse_phase;
    acc_t* row = powers + i * kSeriesTerms;
    acc_t power = 1;
    acc_t sum = 0;
    for (int64_t e = 0; e < kSeriesTerms; ++e) {
      row[e] = power;
      sum += power * series.sums[e];
      power *= t;
    }
    sums[i] += sum;
  }
}

// One row of a block's scores, s_j = scale (x . q_j) + rstd (code . g_j - mean total_j) for
// the queries: the score of the LayerNorm'd code without normalizing the code. top_j becomes the
// max of itself and s_j. Rows run over the padded width (a multiple of 8: no scalar tail; 1.6x
// faster than over R = 24, measured), the padding columns' top held at +inf.
template <typename acc_t>
FUSEDSET_VECTOR_CLONES void combine_scores(acc_t* __restrict scores,
                                           const acc_t* __restrict code_scores,
                                           const acc_t* __restrict totals, int64_t padded,
                                           acc_t scale, acc_t mean, acc_t rstd,
                                           acc_t* __restrict top) {
  for (int64_t j = 0; j < padded; ++j) {
    scores[j] = scale * scores[j] + rstd * (code_scores[j] - mean * totals[j]);
    top[j] = scores[j] > top[j] ? scores[j] : top[j];
  }
}

// One row of a block's scores becomes its softmax weights against the running max top,
// e_j = e^(s_j - top_j) (added to sum_j), times the row's scale: the factor of the row in the
// weighted sum. Padding columns (top +inf) weigh 0.
template <typename acc_t>
FUSEDSET_VECTOR_CLONES void weigh_row(acc_t* __restrict scores, const acc_t* __restrict top,
                                      int64_t padded, acc_t scale, acc_t* __restrict sum) {
  for (int64_t j = 0; j < padded; ++j) {
    const acc_t e = exp_nonpositive(scores[j] - top[j]);
    sum[j] += e;
    scores[j] = e * scale;
  }
}

// The online-softmax state of one task over the rows it has seen, per query j < R: max_j, the
// running max of the scores; sum_j = sum_i e^(s_ij - max_j); pooled_j (C) =
// sum_i e^(s_ij - max_j) row_scale_i x_i. One row of the partials, each part padded queries
// long; the padding queries hold max = +inf, so that they weigh nothing.
template <typename acc_t>
struct State {
  acc_t* pooled;  // (padded x C)
  acc_t* max;     // (padded)
  acc_t* sum;     // (padded)

  State(acc_t* row, int64_t r, int64_t padded, int64_t c)
      : pooled(row), max(row + padded * c), sum(row + padded * (c + 1)) {
    constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
    std::fill(pooled, pooled + padded * c, acc_t(0));
    std::fill(max, max + r, -kInf);
    std::fill(max + r, max + padded, kInf);
    std::fill(sum, sum + padded, acc_t(0));
  }
};

template <typename scalar_t>
void forward_impl(const SinusoidPoolProblem& p, at::Tensor& pooled, at::Tensor& logsumexp) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const int64_t batch = p.batch();
  const int64_t n = p.rows();
  const int64_t c = p.width();
  const int64_t r = p.num_queries();
  const int64_t half = p.divisors.size(0);
  const int64_t d = 2 * half;
  const int64_t padded = padded_width(r);
  const Tasks tasks(n);
  const acc_t* all_code_queries = p.position_queries.const_data_ptr<acc_t>();
  const Series<acc_t> series = make_series(p, all_code_queries);
  // The pairs taken exactly, [0, pairs): their code queries [sines | cosines] (R x 2 pairs).
  const int64_t pairs = series.first_pair;
  std::vector<std::vector<acc_t>> queries, code_queries;
  std::vector<acc_t> totals(batch * padded, acc_t(0)), exact_queries(r * 2 * pairs);
  for (int64_t b = 0; b < batch; ++b) {
    queries.push_back(pack_transposed(p.queries.const_data_ptr<acc_t>() + b * r * c, r, c));
    for (int64_t j = 0; j < r; ++j) {
      const acc_t* g = all_code_queries + (b * r + j) * d;
      std::copy(g, g + pairs, exact_queries.begin() + j * 2 * pairs);
      std::copy(g + half, g + half + pairs, exact_queries.begin() + j * 2 * pairs + pairs);
    }
    code_queries.push_back(pack_transposed(exact_queries.data(), r, 2 * pairs));
    const acc_t* src = p.query_totals.const_data_ptr<acc_t>() + b * r;
    std::copy(src, src + r, totals.begin() + b * padded);
  }
  const int64_t row = padded * (c + 2);
  at::Tensor partial = at::empty({batch * tasks.count, row}, pooled.options());
  acc_t* part = partial.mutable_data_ptr<acc_t>();
  const scalar_t* x_all = p.x.const_data_ptr<scalar_t>();
  const acc_t* positions = p.positions.const_data_ptr<acc_t>();
  const acc_t* row_scale = p.row_scale.defined() ? p.row_scale.const_data_ptr<acc_t>() : nullptr;
  const acc_t* divisors = p.divisors.const_data_ptr<acc_t>();
  const int64_t* lengths = p.lengths.const_data_ptr<int64_t>();
  const acc_t position_scale = static_cast<acc_t>(p.position_scale);
  const acc_t eps = static_cast<acc_t>(p.eps);
  const acc_t largest_inverse_divisor = 1 / p.divisors.abs().min().item<acc_t>();

  run_dynamic(batch * tasks.count, at::get_num_threads(), [&](const auto& next) {
    std::vector<acc_t> scores(kBlock * padded), code_scores(kBlock * padded);
    std::vector<acc_t> codes(kBlock * 2 * pairs), powers(kBlock * kSeriesTerms);
    std::vector<acc_t> sums(kBlock), top(padded), rows_buf;
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t b = task / tasks.count;
      const State<acc_t> s(part + task * row, r, padded, c);
      const int64_t begin = std::min(lengths[b], (task % tasks.count) * tasks.size);
      const int64_t end = std::min(lengths[b], begin + tasks.size);
      for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
        const int64_t count = std::min(kBlock, end - i0);
        const int64_t first_row = b * n + i0;
        const acc_t* x;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          x = x_all + first_row * c;
        } else {
          rows_buf.resize(count * c);
          std::transform(x_all + first_row * c, x_all + (first_row + count) * c,
                         rows_buf.begin(), [](scalar_t v) { return static_cast<acc_t>(v); });
          x = rows_buf.data();
        }
        multiply<acc_t, false>(x, c, count, c, queries[b].data(), padded, scores.data());
        sinusoid_codes(positions + first_row, count, position_scale, divisors, pairs,
                       largest_inverse_divisor, codes.data(), sums.data());
        multiply<acc_t, false>(codes.data(), 2 * pairs, count, 2 * pairs,
                               code_queries[b].data(), padded, code_scores.data());
        if (pairs < half) {
          series_powers(positions + first_row, count, position_scale, series, powers.data(),
                        sums.data());
          multiply<acc_t, true>(powers.data(), kSeriesTerms, count, kSeriesTerms,
                                series.queries[b].data(), padded, code_scores.data());
        }
        std::copy(s.max, s.max + padded, top.begin());
        for (int64_t i = 0; i < count; ++i) {
          // The LayerNorm's statistics: each channel pair has sin^2 + cos^2 = 1, so the
          // variance of a code is 1/2 - mean^2.
          const acc_t mean = sums[i] / d;
          const acc_t rstd = acc_t(1) / std::sqrt(acc_t(0.5) - mean * mean + eps);
          const acc_t scale = row_scale ? row_scale[first_row + i] : acc_t(1);
          combine_scores(scores.data() + i * padded, code_scores.data() + i * padded,
                         totals.data() + b * padded, padded, scale, mean, rstd, top.data());
        }
        for (int64_t j = 0; j < r; ++j) {
          if (top[j] != s.max[j]) {
            const acc_t rescale =
                s.max[j] == -kInf ? acc_t(0) : exp_nonpositive(s.max[j] - top[j]);
            s.sum[j] *= rescale;
            for (int64_t k = 0; k < c; ++k) {
              s.pooled[j * c + k] *= rescale;
            }
            s.max[j] = top[j];
          }
        }
        for (int64_t i = 0; i < count; ++i) {
          const acc_t scale = row_scale ? row_scale[first_row + i] : acc_t(1);
          weigh_row(scores.data() + i * padded, top.data(), padded, scale, s.sum);
        }
        accumulate_weighted(scores.data(), padded, x, count, c, s.pooled);
      }
    }
  });

  // Merge the tasks of each template in order: pooled = sum_t e^(max_t - max) pooled_t / sum.
  acc_t* out = pooled.mutable_data_ptr<acc_t>();
  acc_t* lse = logsumexp.mutable_data_ptr<acc_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const acc_t* first_task = part + b * tasks.count * row;
    for (int64_t j = 0; j < r; ++j) {
      acc_t top = -kInf;
      for (int64_t t = 0; t < tasks.count; ++t) {
        top = std::max(top, first_task[t * row + padded * c + j]);
      }
      acc_t total = 0;
      acc_t* dst = out + (b * r + j) * c;
      std::fill(dst, dst + c, acc_t(0));
      for (int64_t t = 0; t < tasks.count; ++t) {
        const acc_t* task_row = first_task + t * row;
        const acc_t task_max = task_row[padded * c + j];
        if (task_max == -kInf) {
          continue;  // a task wholly in the padding
        }
        const acc_t weight = std::exp(task_max - top);
        total += weight * task_row[padded * (c + 1) + j];
        for (int64_t k = 0; k < c; ++k) {
          dst[k] += weight * task_row[j * c + k];
        }
      }
      for (int64_t k = 0; k < c; ++k) {
        dst[k] /= total;
      }
      lse[b * r + j] = top + std::log(total);
    }
  }
}

void forward_kernel(const SinusoidPoolProblem& p, at::Tensor& pooled, at::Tensor& logsumexp) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "sinusoid_attention_pool_cpu",
                                  [&] { forward_impl<scalar_t>(p, pooled, logsumexp); });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedset, CPU, m) {
  m.impl("sinusoid_attention_pool",
         [](const at::Tensor& x, const at::Tensor& queries, const at::Tensor& position_queries,
            const at::Tensor& positions, const at::Tensor& divisors, double position_scale,
            double eps, const std::optional<at::Tensor>& row_scale,
            const std::optional<at::Tensor>& lengths, bool series) {
           return sinusoid_attention_pool_forward(x, queries, position_queries, positions,
                                                  divisors, position_scale, eps, row_scale,
                                                  lengths, series, forward_kernel);
         });
}

}  // namespace fusedset
