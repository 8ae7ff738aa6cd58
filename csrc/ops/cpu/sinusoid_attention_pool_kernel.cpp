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

  // The first row of task t (tasks of template b are b count to (b + 1) count - 1).
  int64_t start(int64_t task) const { return (task % count) * size; }
};

// The count values from x in the accumulation dtype: x itself, or converted into buffer.
template <typename acc_t, typename scalar_t>
const acc_t* block_rows(const scalar_t* x, int64_t count, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return x;
  } else {
    buffer.resize(count);
    std::transform(x, x + count, buffer.begin(), [](scalar_t v) { return static_cast<acc_t>(v); });
    return buffer.data();
  }
}

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

// out (m x width) += a (m x k) times b (k x width), both row-major at width, element (i, t)
// of a at a[i * row_stride + t * k_stride]: with a the transposed weights of a block's rows
// and b the rows, the weighted sums of the rows for every query. Tiles of 8 (AVX2: 4) rows of
// out by 32 columns: a strip of 32 columns of b serves every row of out from L1.
template <typename T>
void multiply_strips(const T* a, int64_t row_stride, int64_t k_stride, int64_t m, int64_t k,
                     const T* b, int64_t width, T* out) {
  int64_t c0 = 0;
  for (; c0 + 32 <= width; c0 += 32) {
    multiply_rows<T, 32, true>(a, row_stride, k_stride, m, k, b + c0, width, out + c0, width);
  }
  for (; c0 + 8 <= width; c0 += 8) {
    multiply_rows<T, 8, true>(a, row_stride, k_stride, m, k, b + c0, width, out + c0, width);
  }
  for (; c0 < width; ++c0) {
    multiply_rows<T, 1, true>(a, row_stride, k_stride, m, k, b + c0, width, out + c0, width);
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
  // terms[(k - first_pair) kSeriesTerms + t]: the coefficient of t^t in channel pair k's sine
  // (t odd) or cosine (t even)
  std::vector<double> terms;
};

// The series of problem p: the pairs it covers, and the coefficients of the scores of r
// columns and of the channels' sum. code_queries (B, r, D): the columns, reordered
// [sines | cosines].
template <typename acc_t>
Series<acc_t> make_series(const SinusoidPoolProblem& p, const acc_t* code_queries, int64_t r) {
  const int64_t batch = p.batch();
  const int64_t half = p.divisors.size(0);
  Series<acc_t> series{half, 0, {}, {}, {}};
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
  std::vector<double>& terms = series.terms;
  terms.resize((half - first) * kSeriesTerms);
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

// The products of a block's sinusoidal codes with `columns` code query vectors (for the
// forward, position_queries; for the backward, also their derivatives in the positions): the
// pairs of small angle by the series, the others exactly; the channels' sums for the
// LayerNorm's statistics come with them.
template <typename acc_t>
struct CodeProduct {
  int64_t padded;  // row length of the products
  int64_t half;    // channel pairs
  int64_t pairs;   // the exactly taken pairs, [0, pairs)
  Series<acc_t> series;
  std::vector<std::vector<acc_t>> panels;  // per template: the exact pairs' panels
  const acc_t* divisors;
  acc_t position_scale;
  acc_t largest_inverse_divisor;

  // vectors (B, columns, D): the columns, reordered [sines | cosines].
  CodeProduct(const SinusoidPoolProblem& p, const acc_t* vectors, int64_t columns)
      : padded(padded_width(columns)),
        half(p.divisors.size(0)),
        series(make_series(p, vectors, columns)),
        divisors(p.divisors.const_data_ptr<acc_t>()),
        position_scale(static_cast<acc_t>(p.position_scale)),
        largest_inverse_divisor(1 / p.divisors.abs().min().item<acc_t>()) {
    pairs = series.first_pair;
    std::vector<acc_t> exact(columns * 2 * pairs);
    for (int64_t b = 0; b < p.batch(); ++b) {
      for (int64_t j = 0; j < columns; ++j) {
        const acc_t* g = vectors + (b * columns + j) * 2 * half;
        std::copy(g, g + pairs, exact.begin() + j * 2 * pairs);
        std::copy(g + half, g + half + pairs, exact.begin() + j * 2 * pairs + pairs);
      }
      panels.push_back(pack_transposed(exact.data(), columns, 2 * pairs));
    }
  }

  bool has_series() const { return pairs < half; }

  // For the count positions of a block of template b: codes (count x 2 pairs, the exact pairs
  // [sines | cosines]), powers (count x kSeriesTerms, with a series), sums (count) and
  // out (count x padded), the products.
  void multiply_block(int64_t b, const acc_t* positions, int64_t count, acc_t* codes,
                      acc_t* powers, acc_t* sums, acc_t* out) const {
    sinusoid_codes(positions, count, position_scale, divisors, pairs, largest_inverse_divisor,
                   codes, sums);
    multiply<acc_t, false>(codes, 2 * pairs, count, 2 * pairs, panels[b].data(), padded, out);
    if (has_series()) {
      series_powers(positions, count, position_scale, series, powers, sums);
      multiply<acc_t, true>(powers, kSeriesTerms, count, kSeriesTerms, series.queries[b].data(),
                            padded, out);
    }
  }
};

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

// One row's score gradients: with its scores s_j recomputed as combine_scores forms them, the
// softmax weights a_j = e^(s_j - logsumexp_j) and dS_j = a_j (scale (x . g_j) + offset_j), the
// gradient of the loss in s_j. The row's x . q_j and x . g_j in, weights becomes [dS_j | a_j],
// code_scores[j] the score of the LayerNorm'd code, rstd (code . u_j - mean total_j).
template <typename acc_t>
FUSEDSET_VECTOR_CLONES void score_gradients(
    const acc_t* __restrict query_products, const acc_t* __restrict grad_products,
    const acc_t* __restrict code_products, const acc_t* __restrict totals,
    const acc_t* __restrict logsumexp, const acc_t* __restrict offsets, int64_t r, acc_t scale,
    acc_t mean, acc_t rstd, acc_t* __restrict code_scores, acc_t* __restrict weights) {
  for (int64_t j = 0; j < r; ++j) {
    code_scores[j] = rstd * (code_products[j] - mean * totals[j]);
    const acc_t score = scale * query_products[j] + code_scores[j];
    const acc_t a = exp_nonpositive(score - logsumexp[j]);
    weights[j] = a * (scale * grad_products[j] + offsets[j]);
    weights[r + j] = a;
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
  const CodeProduct<acc_t> code(p, p.position_queries.const_data_ptr<acc_t>(), r);
  const int64_t pairs = code.pairs;
  std::vector<std::vector<acc_t>> queries;
  std::vector<acc_t> totals(batch * padded, acc_t(0));
  for (int64_t b = 0; b < batch; ++b) {
    queries.push_back(pack_transposed(p.queries.const_data_ptr<acc_t>() + b * r * c, r, c));
    const acc_t* src = p.query_totals.const_data_ptr<acc_t>() + b * r;
    std::copy(src, src + r, totals.begin() + b * padded);
  }
  const int64_t row = padded * (c + 2);
  at::Tensor partial = at::empty({batch * tasks.count, row}, pooled.options());
  acc_t* part = partial.mutable_data_ptr<acc_t>();
  const scalar_t* x_all = p.x.const_data_ptr<scalar_t>();
  const acc_t* positions = p.positions.const_data_ptr<acc_t>();
  const acc_t* row_scale = p.row_scale.defined() ? p.row_scale.const_data_ptr<acc_t>() : nullptr;
  const int64_t* lengths = p.lengths.const_data_ptr<int64_t>();
  const acc_t eps = static_cast<acc_t>(p.eps);

  run_dynamic(batch * tasks.count, at::get_num_threads(), [&](const auto& next) {
    std::vector<acc_t> scores(kBlock * padded), code_scores(kBlock * padded);
    std::vector<acc_t> codes(kBlock * 2 * pairs), powers(kBlock * kSeriesTerms);
    std::vector<acc_t> sums(kBlock), top(padded), rows_buf;
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t b = task / tasks.count;
      const State<acc_t> s(part + task * row, r, padded, c);
      const int64_t begin = std::min(lengths[b], tasks.start(task));
      const int64_t end = std::min(lengths[b], begin + tasks.size);
      for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
        const int64_t count = std::min(kBlock, end - i0);
        const int64_t first_row = b * n + i0;
        const acc_t* x = block_rows(x_all + first_row * c, count * c, rows_buf);
        multiply<acc_t, false>(x, c, count, c, queries[b].data(), padded, scores.data());
        code.multiply_block(b, positions + first_row, count, codes.data(), powers.data(),
                            sums.data(), code_scores.data());
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
        multiply_strips(scores.data(), 1, padded, padded, count, x, c, s.pooled);
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

// The backward, one pass over the rows in the forward's tasks and blocks. Per row, with
// a_ir = e^(s_ir - logsumexp_r) and dS_ir = a_ir (g_r . (v_i - pooled_r) + glse_r):
//   dv_i = sum_r a_ir g_r + dS_ir q_r,   dx_i = row_scale_i dv_i,   drow_scale_i = x_i . dv_i,
//   dq_r = sum_i dS_ir v_i,   du_r = sum_i dS_ir e_i,
// and through the LayerNorm (e = rstd (c - mean)) and the sines, with sum_r dS_ir u_r the code's
// gradient, dp_i = position_scale rstd [sum_r dS_ir (c_i . w_r) + (m1 - m2 rstd mean)
// (c_i . z)], where w_r = (-u_r,cos,k | u_r,sin,k) / d_k and z = (1 | -1) / d_k are further code
// columns (so the series covers them too), m1 = sum_r dS_ir total_r / D and
// m2 = sum_r dS_ir (e_i . u_r) / D. So one block takes four products with R-wide panels besides
// the forward's: x g_r, dv, dq and du, plus the columns w_r in the codes' product. The shared
// gradients (dq, du) are per-task partials merged in task order.
template <typename scalar_t>
void backward_impl(const SinusoidPoolProblem& p, const SinusoidPoolGradInputs& in,
                   SinusoidPoolGradients& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = p.batch();
  const int64_t n = p.rows();
  const int64_t c = p.width();
  const int64_t r = p.num_queries();
  const int64_t half = p.divisors.size(0);
  const int64_t d = 2 * half;
  const Tasks tasks(n);
  const bool want_rows = out.x.defined() || out.row_scale.defined();
  const bool want_queries = out.queries.defined();
  const bool want_codes = out.position_queries.defined();
  const bool want_positions = out.positions.defined();

  // [q_1 .. q_R, g_1 .. g_R] (2R x C) per template: [dS | a] times it gives dv. x times
  // each half gives the scores' and the g . x products (two products of the forward's width:
  // a 16-wide panel of one 2R-wide product vectorized poorly, measured with perf).
  const int64_t row_columns = 2 * r;
  const int64_t padded = padded_width(r);
  std::vector<acc_t> row_vectors(batch * row_columns * c);
  std::vector<std::vector<acc_t>> query_panels, grad_panels;
  for (int64_t b = 0; b < batch; ++b) {
    acc_t* dst = row_vectors.data() + b * row_columns * c;
    const acc_t* q = p.queries.const_data_ptr<acc_t>() + b * r * c;
    const acc_t* g = in.grad_pooled.const_data_ptr<acc_t>() + b * r * c;
    std::copy(q, q + r * c, dst);
    std::copy(g, g + r * c, dst + r * c);
    query_panels.push_back(pack_transposed(q, r, c));
    grad_panels.push_back(pack_transposed(g, r, c));
  }
  // The code columns [u_1 .. u_R, w_1 .. w_R, z], reordered [sines | cosines] like u.
  const acc_t* divisors = p.divisors.const_data_ptr<acc_t>();
  const int64_t code_columns = want_positions ? 2 * r + 1 : r;
  std::vector<acc_t> code_vectors(batch * code_columns * d);
  for (int64_t b = 0; b < batch; ++b) {
    const acc_t* u = p.position_queries.const_data_ptr<acc_t>() + b * r * d;
    acc_t* dst = code_vectors.data() + b * code_columns * d;
    std::copy(u, u + r * d, dst);
    if (want_positions) {
      for (int64_t j = 0; j <= r; ++j) {
        acc_t* w = dst + (r + j) * d;
        for (int64_t k = 0; k < half; ++k) {
          const acc_t sine = j < r ? -u[j * d + half + k] : acc_t(1);
          const acc_t cosine = j < r ? u[j * d + k] : acc_t(-1);
          w[k] = sine / divisors[k];
          w[half + k] = cosine / divisors[k];
        }
      }
    }
  }
  const CodeProduct<acc_t> code(p, code_vectors.data(), code_columns);
  const int64_t pairs = code.pairs;

  // A task's partials: sum_i dS_ir v_i (R x C); with W_ir = dS_ir rstd_i, sum_i W_ir times
  // the exact pairs' codes (R x 2 pairs), sum_i W_ir t_i^e, the series' moments
  // (R x kSeriesTerms), and sum_i W_ir mean_i (R).
  const int64_t queries_part = want_queries ? r * c : 0;
  const int64_t codes_part = want_codes ? r * (2 * pairs + kSeriesTerms + 1) : 0;
  const int64_t row = queries_part + codes_part;
  at::Tensor partial = at::zeros({batch * tasks.count, row}, p.queries.options());
  acc_t* part = partial.mutable_data_ptr<acc_t>();
  const scalar_t* x_all = p.x.const_data_ptr<scalar_t>();
  const acc_t* positions = p.positions.const_data_ptr<acc_t>();
  const acc_t* row_scale = p.row_scale.defined() ? p.row_scale.const_data_ptr<acc_t>() : nullptr;
  const int64_t* lengths = p.lengths.const_data_ptr<int64_t>();
  const acc_t* totals = p.query_totals.const_data_ptr<acc_t>();
  const acc_t* logsumexp = in.logsumexp.const_data_ptr<acc_t>();
  const acc_t* offsets = in.offsets.const_data_ptr<acc_t>();
  const acc_t eps = static_cast<acc_t>(p.eps);
  const acc_t position_scale = static_cast<acc_t>(p.position_scale);
  scalar_t* grad_x = out.x.defined() ? out.x.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* grad_positions = want_positions ? out.positions.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* grad_row_scale =
      out.row_scale.defined() ? out.row_scale.mutable_data_ptr<acc_t>() : nullptr;

  run_dynamic(batch * tasks.count, at::get_num_threads(), [&](const auto& next) {
    std::vector<acc_t> query_products(kBlock * padded), grad_products(kBlock * padded);
    std::vector<acc_t> code_products(kBlock * code.padded);
    std::vector<acc_t> codes(kBlock * 2 * pairs), powers(kBlock * kSeriesTerms), sums(kBlock);
    std::vector<acc_t> weights(kBlock * row_columns), code_scores(r), rows_buf;
    std::vector<acc_t> value_weights(kBlock * r), code_weights(kBlock * r), dv(kBlock * c);
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t b = task / tasks.count;
      acc_t* part_queries = part + task * row;
      acc_t* part_codes = part_queries + queries_part;
      acc_t* part_moments = part_codes + r * 2 * pairs;
      acc_t* part_means = part_moments + r * kSeriesTerms;
      const int64_t start = tasks.start(task);
      const int64_t stop = std::min(n, start + tasks.size);
      const int64_t begin = std::min(lengths[b], start);
      const int64_t end = std::min(lengths[b], stop);
      // Padding rows were never read: their gradients are zero.
      const int64_t pad = std::clamp(lengths[b], start, stop);
      if (grad_x != nullptr) {
        std::fill(grad_x + (b * n + pad) * c, grad_x + (b * n + stop) * c, scalar_t(0));
      }
      for (acc_t* grad : {grad_positions, grad_row_scale}) {
        if (grad != nullptr) {
          std::fill(grad + b * n + pad, grad + b * n + stop, acc_t(0));
        }
      }
      for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
        const int64_t count = std::min(kBlock, end - i0);
        const int64_t first_row = b * n + i0;
        const acc_t* x = block_rows(x_all + first_row * c, count * c, rows_buf);
        multiply<acc_t, false>(x, c, count, c, query_panels[b].data(), padded,
                               query_products.data());
        multiply<acc_t, false>(x, c, count, c, grad_panels[b].data(), padded,
                               grad_products.data());
        code.multiply_block(b, positions + first_row, count, codes.data(), powers.data(),
                            sums.data(), code_products.data());
        for (int64_t i = 0; i < count; ++i) {
          const acc_t mean = sums[i] / d;
          const acc_t rstd = acc_t(1) / std::sqrt(acc_t(0.5) - mean * mean + eps);
          const acc_t scale = row_scale ? row_scale[first_row + i] : acc_t(1);
          const acc_t* code_row = code_products.data() + i * code.padded;
          acc_t* dS = weights.data() + i * row_columns;
          score_gradients(query_products.data() + i * padded,
                          grad_products.data() + i * padded, code_row, totals + b * r,
                          logsumexp + b * r, offsets + b * r, r, scale, mean, rstd,
                          code_scores.data(), dS);
          for (int64_t j = 0; j < r; ++j) {
            value_weights[i * r + j] = dS[j] * scale;
            code_weights[i * r + j] = dS[j] * rstd;
          }
          if (want_codes) {
            for (int64_t j = 0; j < r; ++j) {
              part_means[j] += code_weights[i * r + j] * mean;
            }
          }
          if (want_positions) {
            acc_t m1 = 0, m2 = 0, slope = 0;
            for (int64_t j = 0; j < r; ++j) {
              m1 += dS[j] * totals[b * r + j];
              m2 += dS[j] * code_scores[j];
              slope += dS[j] * code_row[r + j];
            }
            const acc_t centering = (m1 - m2 * rstd * mean) / d;
            grad_positions[first_row + i] =
                position_scale * rstd * (slope + centering * code_row[2 * r]);
          }
        }
        if (want_queries) {
          multiply_strips(value_weights.data(), 1, r, r, count, x, c, part_queries);
        }
        if (want_codes) {
          multiply_strips(code_weights.data(), 1, r, r, count, codes.data(), 2 * pairs,
                          part_codes);
          if (code.has_series()) {
            multiply_strips(code_weights.data(), 1, r, r, count, powers.data(), kSeriesTerms,
                            part_moments);
          }
        }
        if (want_rows) {
          std::fill(dv.begin(), dv.begin() + count * c, acc_t(0));
          multiply_strips(weights.data(), row_columns, 1, count, row_columns,
                          row_vectors.data() + b * row_columns * c, c, dv.data());
          for (int64_t i = 0; i < count; ++i) {
            const acc_t* dv_i = dv.data() + i * c;
            const acc_t scale = row_scale ? row_scale[first_row + i] : acc_t(1);
            if (grad_x != nullptr) {
              std::transform(dv_i, dv_i + c, grad_x + (first_row + i) * c,
                             [scale](acc_t v) { return static_cast<scalar_t>(scale * v); });
            }
            if (grad_row_scale != nullptr) {
              const acc_t* x_i = x + i * c;
              grad_row_scale[first_row + i] =
                  lane_sum<acc_t>(c, [&](int64_t k) { return x_i[k] * dv_i[k]; });
            }
          }
        }
      }
    }
  });

  // Merge the tasks of each template in order.
  for (int64_t b = 0; b < batch; ++b) {
    const acc_t* first_task = part + b * tasks.count * row;
    if (want_queries) {
      acc_t* dst = out.queries.mutable_data_ptr<acc_t>() + b * r * c;
      std::fill(dst, dst + r * c, acc_t(0));
      for (int64_t t = 0; t < tasks.count; ++t) {
        const acc_t* src = first_task + t * row;
        for (int64_t k = 0; k < r * c; ++k) {
          dst[k] += src[k];
        }
      }
    }
    if (want_codes) {
      std::vector<double> sum(codes_part, 0.0);
      for (int64_t t = 0; t < tasks.count; ++t) {
        const acc_t* src = first_task + t * row + queries_part;
        for (int64_t k = 0; k < codes_part; ++k) {
          sum[k] += src[k];
        }
      }
      const double* sum_codes = sum.data();
      const double* sum_moments = sum_codes + r * 2 * pairs;
      const double* sum_means = sum_moments + r * kSeriesTerms;
      acc_t* dst = out.position_queries.mutable_data_ptr<acc_t>() + b * r * d;
      for (int64_t j = 0; j < r; ++j) {
        // Channel 2k is the sine of pair k, 2k + 1 its cosine.
        for (int64_t k = 0; k < pairs; ++k) {
          dst[j * d + 2 * k] = static_cast<acc_t>(sum_codes[j * 2 * pairs + k] - sum_means[j]);
          dst[j * d + 2 * k + 1] =
              static_cast<acc_t>(sum_codes[j * 2 * pairs + pairs + k] - sum_means[j]);
        }
        for (int64_t k = pairs; k < half; ++k) {
          double sine = 0, cosine = 0;
          const double* terms = code.series.terms.data() + (k - pairs) * kSeriesTerms;
          for (int64_t e = 0; e < kSeriesTerms; ++e) {
            (e % 2 == 1 ? sine : cosine) += terms[e] * sum_moments[j * kSeriesTerms + e];
          }
          dst[j * d + 2 * k] = static_cast<acc_t>(sine - sum_means[j]);
          dst[j * d + 2 * k + 1] = static_cast<acc_t>(cosine - sum_means[j]);
        }
      }
    }
  }
}

void backward_kernel(const SinusoidPoolProblem& p, const SinusoidPoolGradInputs& in,
                     SinusoidPoolGradients& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "sinusoid_attention_pool_backward_cpu",
                                  [&] { backward_impl<scalar_t>(p, in, out); });
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
  m.impl("sinusoid_attention_pool_backward",
         [](const at::Tensor& grad_pooled, const at::Tensor& grad_logsumexp,
            const at::Tensor& pooled, const at::Tensor& logsumexp, const at::Tensor& x,
            const at::Tensor& queries, const at::Tensor& position_queries,
            const at::Tensor& positions, const at::Tensor& divisors, double position_scale,
            double eps, const std::optional<at::Tensor>& row_scale,
            const std::optional<at::Tensor>& lengths, bool series,
            std::array<bool, 5> output_mask) {
           return sinusoid_attention_pool_backward(
               grad_pooled, grad_logsumexp, pooled, logsumexp, x, queries, position_queries,
               positions, divisors, position_scale, eps, row_scale, lengths, series, output_mask,
               backward_kernel);
         });
}

}  // namespace fusedset
