// quality_fps CPU kernel: one sweep over X per selection step (the first computes the norms,
// each later one the distances to the previous pick), so k steps cost at most k reads of X.
// The eval selection's last step usually reads only a few hundred rows (select_from_largest).
// Per row the state is three numbers (d, q^gamma / 2, 1 / q), a fourth with row_scale (the dot
// with the guessed first pick) and another for the select form's source output: N of each per
// template, small next to X (C = 512 values per row).
//
// d encodes availability: d >= 0 a candidate, -1 a zero-norm row (no direction, picked only
// when nothing else remains), -inf padding or already picked.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <queue>
#include <vector>

#include "ops/cpu/dynamic_tasks.h"
#include "ops/cpu/vector_math.h"
#include "ops/lane_sum.h"
#include "ops/quality_fps.h"

namespace fusedset {
namespace {

// Rows per task: large enough that a task's sweep is contiguous memory (2 MB at C = 512, fp32),
// small enough that uneven templates still spread over the threads.
constexpr int64_t kChunkRows = 1024;
// The last step of an eval selection first tries the kLargestRows rows of largest d, then 8
// times as many, and sweeps X once they would be more than 1 / kLargestShare of the template's
// candidates: past that, gathering rows one by one costs about what the sweep does.
constexpr int64_t kLargestRows = 1024;
constexpr int64_t kLargestShare = 4;
// Bytes of X a thread must have to sweep before a second thread is worth waking: on a busy
// machine the wake-up waits for a scheduler slice (milliseconds, measured), longer than a 20 MB
// sweep takes on one core.
constexpr int64_t kBytesPerThread = 32 << 20;

// Grain (in tasks) for at::parallel_for over tasks of rows_per_task rows of row_bytes each.
int64_t task_grain(int64_t rows_per_task, int64_t row_bytes) {
  return std::max<int64_t>(1, kBytesPerThread / std::max<int64_t>(1, rows_per_task * row_bytes));
}

// ||row|| and row . u, in the accumulation type: one sweep of the row each, compiled for AVX2
// and AVX-512 too. flatten: lane_sum must be inlined into each clone; called, it ran 3x slower
// (measured).
template <typename scalar_t, typename acc_t>
FUSEDSET_VECTOR_CLONES __attribute__((flatten)) acc_t row_norm(const scalar_t* row,
                                                               int64_t channels) {
  return std::sqrt(lane_sum<acc_t>(channels, [row](int64_t c) {
    const acc_t v = static_cast<acc_t>(row[c]);
    return v * v;
  }));
}

template <typename scalar_t, typename acc_t>
FUSEDSET_VECTOR_CLONES __attribute__((flatten)) acc_t row_dot(const scalar_t* __restrict row,
                                                              const acc_t* __restrict u,
                                                              int64_t channels) {
  return lane_sum<acc_t>(channels, [row, u](int64_t c) { return static_cast<acc_t>(row[c]) * u[c]; });
}

template <typename acc_t>
struct Best {
  acc_t score = -std::numeric_limits<acc_t>::infinity();
  int64_t index = -1;
};

template <typename scalar_t>
void run(QualityFpsProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  constexpr acc_t kZeroRow = -1;
  // Zero-norm rows score below every candidate but above "nothing left", so the lowest-index
  // rule orders them when they are all that remains.
  constexpr acc_t kZeroRowScore = std::numeric_limits<acc_t>::lowest();

  const int64_t batch = p.x.size(0);
  const int64_t n = p.x.size(1);
  const int64_t channels = p.x.size(2);
  const int64_t steps = p.steps;
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  const int64_t* lengths = p.lengths.const_data_ptr<int64_t>();
  const acc_t* noise = p.noise.defined() ? p.noise.const_data_ptr<acc_t>() : nullptr;
  acc_t* logits = p.logits.defined() ? p.logits.mutable_data_ptr<acc_t>() : nullptr;
  int32_t* source = p.source.defined() ? p.source.mutable_data_ptr<int32_t>() : nullptr;
  int64_t* indices = p.indices.mutable_data_ptr<int64_t>();
  const acc_t* row_scale = p.row_scale.defined() ? p.row_scale.const_data_ptr<acc_t>() : nullptr;
  const acc_t gamma = static_cast<acc_t>(p.gamma);
  const acc_t scale = static_cast<acc_t>(p.scale);

  std::vector<acc_t> d(batch * n), half_qg(batch * n), inv_q(batch * n);
  // The pick each d comes from, for the source output only.
  std::vector<int32_t> src(source ? batch * n : 0, -1);
  std::vector<acc_t> unit(batch * channels);  // direction of each template's latest pick

  // With row_scale the first pick is almost always the row of the largest |row_scale| (unit
  // directions and norms: it is the largest norm up to rounding). The first sweep then also
  // takes every row's dot with that row's direction; when the pick confirms the guess, the
  // second step reads those dots instead of X: two sweeps of X for three picks instead of
  // three. The dots are the very sums the second sweep would take, so the picks are the same
  // either way. Not with noise: the training form's first pick is not the largest norm.
  std::vector<int64_t> guess(batch, -1);
  std::vector<char> guessed_right(batch, 0);
  std::vector<acc_t> guess_unit, guess_dot;
  if (row_scale && !noise && steps > 1) {
    guess_unit.resize(batch * channels);
    guess_dot.resize(batch * n);
    for (int64_t b = 0; b < batch; ++b) {
      acc_t largest = 0;
      for (int64_t i = 0; i < lengths[b]; ++i) {
        const acc_t size = std::abs(row_scale[b * n + i]);
        if (size > largest) {
          largest = size;
          guess[b] = i;
        }
      }
      if (guess[b] < 0) {
        continue;
      }
      const int64_t r = b * n + guess[b];
      const scalar_t* row = x + r * channels;
      const acc_t q = std::abs(row_scale[r]) * row_norm<scalar_t, acc_t>(row, channels);
      if (!(q > 0) || !std::isfinite(q)) {
        guess[b] = -1;  // no direction to measure from; the sweeps will name a bad row
        continue;
      }
      const acc_t to_unit = row_scale[r] * (1 / q);
      for (int64_t c = 0; c < channels; ++c) {
        guess_unit[b * channels + c] = static_cast<acc_t>(row[c]) * to_unit;
      }
    }
  }
  const int64_t chunks = (n + kChunkRows - 1) / kChunkRows;
  const int64_t tasks = batch * chunks;
  std::vector<Best<acc_t>> partial(tasks);
  std::vector<int64_t> first_bad(tasks);
  const int64_t grain =
      task_grain(std::min(n, kChunkRows), channels * static_cast<int64_t>(sizeof(scalar_t)));

  // The distance of row r (of template b) to the pick of step t - 1, for t >= 1: one
  // expression for the sweep and select_from_largest, so that both reach the same bits.
  const auto distance = [&](int64_t b, int64_t r, int64_t t) {
    const acc_t dot = t == 1 && guessed_right[b]
                          ? guess_dot[r]
                          : (row_scale ? row_scale[r] : acc_t(1)) *
                                row_dot<scalar_t, acc_t>(x + r * channels,
                                                         unit.data() + b * channels, channels);
    return half_qg[r] * std::max<acc_t>(0, 1 - inv_q[r] * dot);
  };
  // The last step of the eval selection (no noise, no logits) needs the argmax of the updated
  // d only, not d itself. An update can only lower d, so a row whose current d is below the
  // best updated value cannot win: update the rows of largest d from their gathered rows, and
  // when the best of them beats every d left out, that is the pick and X is not swept. About
  // 500 of 1e5 rows in the benchmark's template (random directions) and 1,000 in a clustered
  // one. False when the rows to gather would grow past 1 / kLargestShare of the candidates.
  // The Triton kernels sweep every step: a sweep of that template takes an H100 about 61 us.
  const auto select_from_largest = [&](int64_t b, int64_t t, Best<acc_t>& best) {
    const acc_t* db = d.data() + b * n;
    for (int64_t top = kLargestRows;; top *= 8) {
      // The top-th largest d of the candidates: a min-heap of the largest seen, so that most
      // rows cost one comparison (2.5x faster than nth_element on a copy, and no N-sized copy).
      std::priority_queue<acc_t, std::vector<acc_t>, std::greater<>> largest;
      int64_t count = 0;
      for (int64_t i = 0; i < lengths[b]; ++i) {
        if (db[i] >= 0) {
          ++count;
          if (static_cast<int64_t>(largest.size()) < top || db[i] > largest.top()) {
            largest.push(db[i]);
            if (static_cast<int64_t>(largest.size()) > top) {
              largest.pop();
            }
          }
        }
      }
      if (top * kLargestShare > count) {
        return false;
      }
      const acc_t threshold = largest.top();  // >= 0: zero-norm rows and picks are left out
      Best<acc_t> found;
      for (int64_t i = 0; i < lengths[b]; ++i) {
        if (db[i] >= threshold) {
          const acc_t dist = distance(b, b * n + i, t);
          const acc_t score = (dist < db[i] ? dist : db[i]) * scale;
          if (score > found.score) {
            found = {score, i};
          }
        }
      }
      // Strictly above: a row left out ties at most, and might have the lower index.
      if (found.score > threshold * scale) {
        best = found;
        return true;
      }
    }
  };
  const bool last_from_largest = !noise && !logits && scale > 0;
  std::vector<char> settled(batch);
  std::vector<Best<acc_t>> settled_best(batch);

  const int64_t threads = (tasks + grain - 1) / grain;
  for (int64_t t = 0; t < steps; ++t) {
    std::fill(settled.begin(), settled.end(), 0);
    if (last_from_largest && t >= 2 && t == steps - 1) {
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          settled[b] = select_from_largest(b, t, settled_best[b]);
        }
      });
    }
    run_dynamic(tasks, threads, [&](const auto& next) {
      for (int64_t task = next(); task >= 0; task = next()) {
        const int64_t b = task / chunks;
        if (settled[b]) {
          continue;
        }
        const int64_t lo = (task % chunks) * kChunkRows;
        const int64_t hi = std::min(n, lo + kChunkRows);
        const acc_t* g = noise ? noise + (b * steps + t) * n : nullptr;
        Best<acc_t> best;
        int64_t bad = n;
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t r = b * n + i;
          const scalar_t* row = x + r * channels;
          const acc_t row_factor = row_scale ? row_scale[r] : acc_t(1);
          if (t == 0) {
            if (i >= lengths[b]) {
              d[r] = -kInf;
              continue;
            }
            const acc_t q = std::abs(row_factor) * row_norm<scalar_t, acc_t>(row, channels);
            if (!std::isfinite(q)) {
              bad = std::min(bad, i);
            }
            const bool direction = q > 0;
            d[r] = direction ? q : kZeroRow;
            half_qg[r] = direction ? std::pow(q, gamma) / 2 : 0;
            inv_q[r] = direction ? 1 / q : 0;
            if (guess[b] >= 0) {
              // A second sweep of the row, from L1: one sweep taking both sums vectorized
              // badly (GCC permuted lanes) and ran 2x slower.
              guess_dot[r] = row_factor * row_dot<scalar_t, acc_t>(
                                              row, guess_unit.data() + b * channels, channels);
            }
          } else if (d[r] >= 0) {
            const acc_t dist = distance(b, r, t);
            // The first distance replaces the norm; later ones keep the older pick on ties.
            if (t == 1 || dist < d[r]) {
              d[r] = dist;
              if (source) {
                src[r] = static_cast<int32_t>(t - 1);
              }
            }
          }
          const acc_t score = d[r] >= 0 ? d[r] * scale + (g ? g[i] : 0)
                                        : (d[r] == kZeroRow ? kZeroRowScore : -kInf);
          if (score > best.score) {
            best = {score, i};
          }
        }
        if (logits) {
          const int64_t out = (b * steps + t) * n;
          for (int64_t i = lo; i < hi; ++i) {
            const int64_t r = b * n + i;
            logits[out + i] = d[r] >= 0 ? d[r] : -kInf;
            source[out + i] = d[r] >= 0 ? src[r] : -1;
          }
        }
        partial[task] = best;
        first_bad[task] = bad;
      }
    });
    for (int64_t b = 0; b < batch; ++b) {
      Best<acc_t> best = settled[b] ? settled_best[b] : Best<acc_t>{};
      for (int64_t c = 0; c < chunks && !settled[b]; ++c) {
        const int64_t task = b * chunks + c;
        TORCH_CHECK_VALUE(t > 0 || first_bad[task] == n, "quality_fps: x[", b, ", ",
                          first_bad[task], "] is not finite (NaN or inf in a valid row)");
        // Chunks come in index order: a strictly larger score is needed to replace the best.
        if (partial[task].score > best.score) {
          best = partial[task];
        }
      }
      indices[b * steps + t] = best.index;
      if (t == 0) {
        guessed_right[b] = guess[b] >= 0 && best.index == guess[b];
      }
      if (best.index < 0) {
        continue;
      }
      const int64_t r = b * n + best.index;
      d[r] = -kInf;
      const acc_t to_unit = (row_scale ? row_scale[r] : acc_t(1)) * inv_q[r];
      for (int64_t c = 0; c < channels; ++c) {
        unit[b * channels + c] = static_cast<acc_t>(x[r * channels + c]) * to_unit;
      }
    }
  }
}

template <typename scalar_t>
void dots_impl(const at::Tensor& x, const at::Tensor& m, at::Tensor& dots, at::Tensor& q) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(1);
  const int64_t channels = x.size(2);
  const int64_t width = m.size(1);
  const scalar_t* xs = x.const_data_ptr<scalar_t>();
  const acc_t* ms = m.const_data_ptr<acc_t>();
  acc_t* out = dots.mutable_data_ptr<acc_t>();
  acc_t* norms = q.mutable_data_ptr<acc_t>();
  // Each row is swept width + 1 times while it sits in L1: X is read from memory once.
  const int64_t grain = task_grain(1, channels * static_cast<int64_t>(sizeof(scalar_t)));
  at::parallel_for(0, x.size(0) * n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = xs + r * channels;
      const acc_t* mb = ms + (r / n) * width * channels;
      norms[r] = std::sqrt(lane_sum<acc_t>(channels, [row](int64_t c) {
        const acc_t v = static_cast<acc_t>(row[c]);
        return v * v;
      }));
      for (int64_t j = 0; j < width; ++j) {
        const acc_t* mj = mb + j * channels;
        out[r * width + j] = lane_sum<acc_t>(
            channels, [row, mj](int64_t c) { return static_cast<acc_t>(row[c]) * mj[c]; });
      }
    }
  });
}

template <typename scalar_t>
void spread_impl(const at::Tensor& x, const at::Tensor& coef, const at::Tensor& beta,
                 const at::Tensor& x_picked, at::Tensor& dx, at::Tensor& into) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = x.size(0);
  const int64_t n = x.size(1);
  const int64_t channels = x.size(2);
  const int64_t width = beta.size(2);
  const scalar_t* xs = x.const_data_ptr<scalar_t>();
  const acc_t* co = coef.const_data_ptr<acc_t>();
  const acc_t* be = beta.const_data_ptr<acc_t>();
  const acc_t* picked = x_picked.const_data_ptr<acc_t>();
  scalar_t* out = dx.mutable_data_ptr<scalar_t>();
  const int64_t chunks = (n + kChunkRows - 1) / kChunkRows;
  // beta^T x is summed per chunk, then the chunks in order: the same bits on every run.
  std::vector<acc_t> partial(batch * chunks * width * channels, 0);
  const int64_t grain =
      task_grain(std::min(n, kChunkRows), channels * static_cast<int64_t>(sizeof(scalar_t)));
  at::parallel_for(0, batch * chunks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row_out(channels);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks;
      const int64_t lo = (task % chunks) * kChunkRows;
      const int64_t hi = std::min(n, lo + kChunkRows);
      acc_t* acc = partial.data() + task * width * channels;
      const acc_t* pb = picked + b * width * channels;
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t r = b * n + i;
        const scalar_t* row = xs + r * channels;
        const acc_t* br = be + r * width;
        scalar_t* dst = out + r * channels;
        // Untouched rows (padding among them) are not read: their gradient is zero whatever
        // they hold, NaN included.
        if (co[r] == 0 && std::all_of(br, br + width, [](acc_t v) { return v == 0; })) {
          std::fill(dst, dst + channels, scalar_t(0));
          continue;
        }
        for (int64_t c = 0; c < channels; ++c) {
          row_out[c] = co[r] * static_cast<acc_t>(row[c]);
        }
        for (int64_t j = 0; j < width; ++j) {
          const acc_t w = br[j];
          const acc_t* pj = pb + j * channels;
          acc_t* aj = acc + j * channels;
          for (int64_t c = 0; c < channels; ++c) {
            row_out[c] += w * pj[c];
            aj[c] += w * static_cast<acc_t>(row[c]);
          }
        }
        for (int64_t c = 0; c < channels; ++c) {
          dst[c] = static_cast<scalar_t>(row_out[c]);
        }
      }
    }
  });
  acc_t* total = into.mutable_data_ptr<acc_t>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const acc_t* src = partial.data() + (b * chunks + chunk) * width * channels;
      acc_t* dst = total + b * width * channels;
      for (int64_t e = 0; e < width * channels; ++e) {
        dst[e] += src[e];
      }
    }
  }
}

void dots_kernel(const at::Tensor& x, const at::Tensor& m, at::Tensor& dots, at::Tensor& q) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "quality_fps_backward_dots_cpu",
                                  [&] { dots_impl<scalar_t>(x, m, dots, q); });
}

void spread_kernel(const at::Tensor& x, const at::Tensor& coef, const at::Tensor& beta,
                   const at::Tensor& x_picked, at::Tensor& dx, at::Tensor& into) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "quality_fps_backward_spread_cpu",
      [&] { spread_impl<scalar_t>(x, coef, beta, x_picked, dx, into); });
}

void kernel(QualityFpsProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "quality_fps_cpu",
                                  [&] { run<scalar_t>(p); });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedset, CPU, m) {
  m.impl("quality_fps",
         [](const at::Tensor& x, int64_t k, const at::Tensor& gamma,
            const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& row_scale) {
           return quality_fps_forward(x, gamma, k, lengths, row_scale, kernel);
         });
  m.impl("quality_fps_select",
         [](const at::Tensor& x, int64_t k, const at::Tensor& gamma, double tau, double scale,
            const at::Tensor& noise, const std::optional<at::Tensor>& lengths) {
           return quality_fps_select_forward(x, gamma, noise, scale, tau, k, lengths, kernel);
         });
  m.impl("quality_fps_backward_dots", [](const at::Tensor& x, const at::Tensor& m) {
    return quality_fps_backward_dots(x, m, dots_kernel);
  });
  m.impl("quality_fps_backward_spread", [](const at::Tensor& x, const at::Tensor& coef,
                                           const at::Tensor& beta, const at::Tensor& x_picked) {
    return quality_fps_backward_spread(x, coef, beta, x_picked, spread_kernel);
  });
}

}  // namespace fusedset
