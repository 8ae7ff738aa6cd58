// cluster_accumulate CPU kernels. M is tiny and N huge, so the work is a stream over the images:
// each task owns a chunk of one probe's images, walks it in blocks of kBlock, keeps the block's
// M x kBlock assignment in a task-local buffer and folds it into per-task partial sums. The
// partials are then added in chunk order, so the result depends on the shapes only, never on
// the thread count or schedule.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops/cluster_accumulate.h"
#include "ops/cpu/dynamic_tasks.h"
#include "ops/cpu/vector_math.h"

namespace fusedset {
namespace {

constexpr int64_t kBlock = 64;
// A chunk is at least kMinChunk images and a probe has at most kMaxChunks of them: enough tasks
// to keep the cores busy at B = 1, and partial buffers whose size does not grow with N.
constexpr int64_t kMinChunk = 256;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kLanes = 16;
constexpr double kNormEps = 1e-5;

struct Chunks {
  int64_t count;
  int64_t size;

  explicit Chunks(int64_t n) {
    const int64_t wanted = std::clamp<int64_t>((n + kMinChunk - 1) / kMinChunk, 1, kMaxChunks);
    size = std::max<int64_t>(1, (n + wanted - 1) / wanted);
    count = std::max<int64_t>(1, (n + size - 1) / size);
  }
};

// 32 bytes of acc_t: one AVX register (two SSE registers in the baseline clone). The helpers
// that take and return it are always inlined into target_clones functions, so the baseline ABI
// for passing it, which GCC warns about (-Wpsabi), never applies.
#pragma GCC diagnostic ignored "-Wpsabi"
// (GCC ignores vector_size on a dependent type, so each type is spelled out.)
template <typename acc_t>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename acc_t>
using Vec = typename VecOf<acc_t>::type;

template <typename acc_t>
__attribute__((always_inline)) inline Vec<acc_t> load_vec(const acc_t* p) {
  Vec<acc_t> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc_t>
__attribute__((always_inline)) inline void store_vec(acc_t* p, const Vec<acc_t>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// Asks for the cache lines of x[0..count). Prefetches never fault, so x may run past the end.
template <typename T>
inline void prefetch(const T* x, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(x);
  for (int64_t offset = 0; offset < count * int64_t(sizeof(T)); offset += 64) {
    __builtin_prefetch(bytes + offset);
  }
}

// Independent partial sums break the add dependency chain so the loop vectorizes.
template <typename acc_t>
FUSEDSET_VECTOR_CLONES acc_t dot(const acc_t* x, const acc_t* y, int64_t n) {
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      part[l] += x[i + l] * y[i + l];
    }
  }
  acc_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    total += part[l];
  }
  for (; i < n; ++i) {
    total += x[i] * y[i];
  }
  return total;
}

// out[j * kBlock + i] = xs[i] . centers[j] for the count rows of xs (count x n) and the m
// centers (m x n). Two rows and four centers per sweep: eight independent FMA chains hide the FMA
// latency, each center vector loaded serves two rows, and the accumulators fit AVX2's 16
// registers. An odd last row is paired with itself.
template <typename acc_t>
FUSEDSET_VECTOR_CLONES void block_dots(const acc_t* __restrict xs, int64_t count,
                                       const acc_t* __restrict centers, int64_t n, int64_t m,
                                       acc_t* __restrict out) {
  constexpr int64_t kLanesPerVec = sizeof(Vec<acc_t>) / sizeof(acc_t);
  for (int64_t i = 0; i < count; i += 2) {
    const acc_t* x0 = xs + i * n;
    const acc_t* x1 = i + 1 < count ? x0 + n : x0;
    int64_t j = 0;
    for (; j + 4 <= m; j += 4) {
      const acc_t* c0 = centers + j * n;
      Vec<acc_t> s[4][2] = {};
      int64_t t = 0;
      for (; t + kLanesPerVec <= n; t += kLanesPerVec) {
        const Vec<acc_t> v0 = load_vec(x0 + t);
        const Vec<acc_t> v1 = load_vec(x1 + t);
        for (int64_t c = 0; c < 4; ++c) {
          const Vec<acc_t> center = load_vec(c0 + c * n + t);
          s[c][0] += v0 * center;
          s[c][1] += v1 * center;
        }
      }
      for (int64_t c = 0; c < 4; ++c) {
        acc_t total0 = 0, total1 = 0;
        for (int64_t l = 0; l < kLanesPerVec; ++l) {
          total0 += s[c][0][l];
          total1 += s[c][1][l];
        }
        for (int64_t u = t; u < n; ++u) {
          total0 += x0[u] * c0[c * n + u];
          total1 += x1[u] * c0[c * n + u];
        }
        out[(j + c) * kBlock + i] = total0;
        if (x1 != x0) {
          out[(j + c) * kBlock + i + 1] = total1;
        }
      }
    }
    for (; j < m; ++j) {
      out[j * kBlock + i] = dot(x0, centers + j * n, n);
      if (x1 != x0) {
        out[j * kBlock + i + 1] = dot(x1, centers + j * n, n);
      }
    }
  }
}

template <typename acc_t>
FUSEDSET_VECTOR_CLONES void axpy(acc_t* __restrict y, acc_t a, const acc_t* __restrict x,
                                 int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    y[i] += a * x[i];
  }
}

// The softmax over centers of each column of logits a (M x kBlock, columns 0..count), in place.
template <typename acc_t>
FUSEDSET_VECTOR_CLONES void softmax_columns(acc_t* __restrict a, int64_t count, int64_t m) {
  acc_t top[kBlock], total[kBlock];
  std::fill(top, top + count, -std::numeric_limits<acc_t>::infinity());
  std::fill(total, total + count, acc_t(0));
  for (int64_t j = 0; j < m; ++j) {
    const acc_t* aj = a + j * kBlock;
    for (int64_t i = 0; i < count; ++i) {
      top[i] = aj[i] > top[i] ? aj[i] : top[i];
    }
  }
  for (int64_t j = 0; j < m; ++j) {
    acc_t* aj = a + j * kBlock;
    for (int64_t i = 0; i < count; ++i) {
      aj[i] = exp_nonpositive(aj[i] - top[i]);
      total[i] += aj[i];
    }
  }
  for (int64_t i = 0; i < count; ++i) {
    total[i] = acc_t(1) / total[i];
  }
  for (int64_t j = 0; j < m; ++j) {
    acc_t* aj = a + j * kBlock;
    for (int64_t i = 0; i < count; ++i) {
      aj[i] *= total[i];
    }
  }
}

// out (len) = sum over the m centers of w[j * stride] * rows[j] (rows m x len), plus out itself
// when add. Four centers per sweep, so out is loaded and stored once per four.
template <typename acc_t>
FUSEDSET_VECTOR_CLONES void combine(const acc_t* __restrict w, int64_t stride,
                                    const acc_t* __restrict rows, int64_t len, int64_t m,
                                    bool add, acc_t* __restrict out) {
  if (!add) {
    std::fill(out, out + len, acc_t(0));
  }
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    const acc_t w0 = w[j * stride], w1 = w[(j + 1) * stride], w2 = w[(j + 2) * stride],
                w3 = w[(j + 3) * stride];
    const acc_t* r0 = rows + j * len;
    const acc_t* r1 = r0 + len;
    const acc_t* r2 = r1 + len;
    const acc_t* r3 = r2 + len;
    for (int64_t t = 0; t < len; ++t) {
      out[t] += w0 * r0[t] + w1 * r1[t] + w2 * r2[t] + w3 * r3[t];
    }
  }
  for (; j < m; ++j) {
    axpy(out, w[j * stride], rows + j * len, len);
  }
}

template <typename acc_t, typename scalar_t>
FUSEDSET_VECTOR_CLONES void store_cast(const acc_t* __restrict x, int64_t len,
                                       scalar_t* __restrict out) {
  for (int64_t t = 0; t < len; ++t) {
    out[t] = static_cast<scalar_t>(x[t]);
  }
}

// out = r dv - radial v, in the output dtype: the value gradient of one image.
template <typename acc_t, typename scalar_t>
FUSEDSET_VECTOR_CLONES void store_value_grad(const acc_t* __restrict dv,
                                             const acc_t* __restrict v, acc_t r, acc_t radial,
                                             int64_t len, scalar_t* __restrict out) {
  for (int64_t t = 0; t < len; ++t) {
    out[t] = static_cast<scalar_t>(r * dv[t] - radial * v[t]);
  }
}

// Memory the next block reads first (its keys): accumulate_rows asks for it a slice per column
// tile, while its loop runs on rows already in cache. Spread out like this, the requests neither
// flood the miss queue nor leave the next block's key scoring waiting on DRAM (where 38% of the
// forward's time went): 1.1-1.3x faster on one thread, 1.04x on two (A/B, N = 65536).
struct Ahead {
  const char* data = nullptr;
  int64_t bytes = 0;
};

// acc (M x cols) += w (M x kBlock, columns 0..count) @ rows (count x cols). Four centers times two
// vectors of columns stay in registers over all rows of the block (8 accumulators, 2 row vectors
// and 4 weights fit AVX2's 16 registers), so acc is loaded and stored once per block and the loop
// is bound by FMAs, not by loads and stores of acc. Walking the rows a column tile at a time
// defeats the hardware prefetcher, so callers ask for the rows first (Block::load does).
// (A loop over pairs of rows, acc loaded and stored per pair, keeps the rows sequential but ran
// 1.5x slower.)
template <typename acc_t>
FUSEDSET_VECTOR_CLONES void accumulate_rows(const acc_t* __restrict w,
                                            const acc_t* __restrict rows, int64_t cols,
                                            int64_t count, int64_t m, acc_t* __restrict acc,
                                            Ahead ahead = {}) {
  constexpr int64_t kLanesPerVec = sizeof(Vec<acc_t>) / sizeof(acc_t);
  constexpr int64_t kTile = 2 * kLanesPerVec;
  const int64_t lines = (ahead.bytes + 63) / 64;
  const int64_t tiles = std::max<int64_t>(1, cols / kTile);
  const int64_t lines_per_tile = (lines + tiles - 1) / tiles;
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    const acc_t* w0 = w + j * kBlock;
    acc_t* a0 = acc + j * cols;
    int64_t t = 0;
    for (; t + kTile <= cols; t += kTile) {
      const int64_t first = t / kTile * lines_per_tile;
      if (j == 0 && first < lines) {
        prefetch(ahead.data + first * 64, std::min(lines_per_tile, lines - first) * 64);
      }
      Vec<acc_t> s[4][2];
      for (int64_t c = 0; c < 4; ++c) {
        s[c][0] = load_vec(a0 + c * cols + t);
        s[c][1] = load_vec(a0 + c * cols + t + kLanesPerVec);
      }
      for (int64_t i = 0; i < count; ++i) {
        const Vec<acc_t> r0 = load_vec(rows + i * cols + t);
        const Vec<acc_t> r1 = load_vec(rows + i * cols + t + kLanesPerVec);
        for (int64_t c = 0; c < 4; ++c) {
          const acc_t weight = w0[c * kBlock + i];
          s[c][0] += weight * r0;
          s[c][1] += weight * r1;
        }
      }
      for (int64_t c = 0; c < 4; ++c) {
        store_vec(a0 + c * cols + t, s[c][0]);
        store_vec(a0 + c * cols + t + kLanesPerVec, s[c][1]);
      }
    }
    for (int64_t c = 0; c < 4 && t < cols; ++c) {
      for (int64_t i = 0; i < count; ++i) {
        axpy(a0 + c * cols + t, w0[c * kBlock + i], rows + i * cols + t, cols - t);
      }
    }
  }
  for (; j < m; ++j) {
    for (int64_t i = 0; i < count; ++i) {
      axpy(acc + j * cols, w[j * kBlock + i], rows + i * cols, cols);
    }
  }
}

// count rows of the input in the accumulation type: in place for float32/float64 inputs,
// converted into buf for float16/bfloat16.
template <typename scalar_t, typename acc_t>
const acc_t* rows_as_acc(const scalar_t* src, int64_t count, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    buf.resize(count);
    for (int64_t t = 0; t < count; ++t) {
      buf[t] = static_cast<acc_t>(src[t]);
    }
    return buf.data();
  }
}

// Typed views of a problem, for one probe b.
template <typename scalar_t, typename acc_t>
struct Probe {
  const scalar_t* keys;    // (N, D)
  const scalar_t* values;  // (N, C)
  const acc_t* queries;    // (M, D)
  const acc_t* bias;       // (M)
  int64_t d, c, m;
  acc_t scale;
  bool normalize;

  Probe(const ClusterProblem& p, int64_t b)
      : keys(p.keys.const_data_ptr<scalar_t>() + b * p.images() * p.key_dim()),
        values(p.values.const_data_ptr<scalar_t>() + b * p.images() * p.value_dim()),
        queries(p.queries.const_data_ptr<acc_t>() +
                (p.shared_queries() ? 0 : b) * p.centers() * p.key_dim()),
        bias(p.bias.const_data_ptr<acc_t>() + (p.shared_queries() ? 0 : b) * p.centers()),
        d(p.key_dim()),
        c(p.value_dim()),
        m(p.centers()),
        scale(static_cast<acc_t>(p.scale)),
        normalize(p.normalize_values) {}
};

// One block of images in the accumulation type, with its assignment: a (M x kBlock) is the
// softmax over centers of each image's logits, r the factor its value row enters with
// (1 / (||v|| + eps) when values are normalized, else 1).
template <typename scalar_t, typename acc_t>
struct Block {
  const acc_t* k = nullptr;  // (count, D)
  const acc_t* v = nullptr;  // (count, C)
  int64_t count = 0;
  std::vector<acc_t> a, r, k_buf, v_buf;

  explicit Block(int64_t m) : a(m * kBlock), r(kBlock) {}

  void load(const Probe<scalar_t, acc_t>& p, int64_t i0, int64_t n) {
    count = n;
    k = rows_as_acc(p.keys + i0 * p.d, n * p.d, k_buf);
    v = rows_as_acc(p.values + i0 * p.c, n * p.c, v_buf);
    // accumulate_rows walks the block's values column tile by column tile, a pattern the
    // hardware prefetcher does not follow: ask for each pair of rows while the keys of the pair
    // are scored (all at once, the requests overflow the miss queue and stall: 1.4x slower;
    // asking for the keys here too was 1.3x slower: the forward asks for them a block ahead,
    // see Ahead; asking for the next block's values during this block's accumulation, with
    // its key scoring interleaved, was 1.6x slower: 128 KB of them evict the rows in use).
    for (int64_t i = 0; i < n; i += 2) {
      prefetch(v + i * p.c, 2 * p.c);
      block_dots(k + i * p.d, std::min<int64_t>(2, n - i), p.queries, p.d, p.m, a.data() + i);
    }
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < p.m; ++j) {
        a[j * kBlock + i] = (a[j * kBlock + i] + p.bias[j]) * p.scale;
      }
      const acc_t* vi = v + i * p.c;
      r[i] = p.normalize
                 ? acc_t(1) / (std::sqrt(dot(vi, vi, p.c)) + static_cast<acc_t>(kNormEps))
                 : acc_t(1);
    }
    softmax_columns(a.data(), n, p.m);
  }
};

// Runs body(task, b, begin, end) for every (probe, chunk) task in parallel, the tasks handed out
// one at a time (dynamic_tasks.h).
template <typename Body>
void for_each_chunk(const ClusterProblem& p, const Chunks& chunks, const Body& body) {
  const int64_t n = p.images();
  run_dynamic(p.batch() * chunks.count, at::get_num_threads(), [&](const auto& next) {
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t b = task / chunks.count;
      const int64_t begin = std::min(n, (task % chunks.count) * chunks.size);
      body(task, b, begin, std::min(n, begin + chunks.size));
    }
  });
}

// out[g] = sum over k in order of partial[g * terms + k], rows of length len.
template <typename acc_t>
void reduce_in_order(const acc_t* partial, int64_t groups, int64_t terms, int64_t len,
                     acc_t* out) {
  at::parallel_for(0, groups, 1, [&](int64_t first, int64_t last) {
    for (int64_t g = first; g < last; ++g) {
      acc_t* dst = out + g * len;
      std::fill(dst, dst + len, acc_t(0));
      for (int64_t k = 0; k < terms; ++k) {
        axpy(dst, acc_t(1), partial + (g * terms + k) * len, len);
      }
    }
  });
}

template <typename scalar_t>
void forward_impl(const ClusterProblem& p, at::Tensor& num, at::Tensor& den,
                  at::Tensor& key_num) {
  using acc_t = at::opmath_type<scalar_t>;
  const Chunks chunks(p.images());
  const int64_t m = p.centers();
  const int64_t c = p.value_dim();
  const int64_t kd = key_num.size(2);
  // One row per task: [num (M x C) | key_num (M x kd) | den (M)].
  const int64_t row = m * (c + kd + 1);
  const int64_t tasks = p.batch() * chunks.count;
  at::Tensor partial = at::zeros({tasks, row}, num.options());
  acc_t* part = partial.mutable_data_ptr<acc_t>();
  for_each_chunk(p, chunks, [&](int64_t task, int64_t b, int64_t begin, int64_t end) {
    const Probe<scalar_t, acc_t> probe(p, b);
    acc_t* t_num = part + task * row;
    acc_t* t_key = t_num + m * c;
    acc_t* t_den = t_key + m * kd;
    Block<scalar_t, acc_t> block(m);
    std::vector<acc_t> weight(m * kBlock);
    for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
      const int64_t count = std::min(kBlock, end - i0);
      block.load(probe, i0, count);
      for (int64_t j = 0; j < m; ++j) {
        // A local sum: a store to weight may alias t_den, which would put a store and a load
        // on every step of the sum.
        acc_t den = t_den[j];
        for (int64_t i = 0; i < count; ++i) {
          const acc_t a = block.a[j * kBlock + i];
          weight[j * kBlock + i] = a * block.r[i];
          den += a;
        }
        t_den[j] = den;
      }
      const int64_t next = std::min(kBlock, end - i0 - count);
      const Ahead next_keys{reinterpret_cast<const char*>(probe.keys + (i0 + count) * probe.d),
                            next * probe.d * static_cast<int64_t>(sizeof(scalar_t))};
      accumulate_rows(weight.data(), block.v, c, count, m, t_num, next_keys);
      if (kd > 0) {
        accumulate_rows(block.a.data(), block.k, kd, count, m, t_key);
      }
    }
  });
  at::Tensor total = at::empty({p.batch(), row}, num.options());
  reduce_in_order(part, p.batch(), chunks.count, row, total.mutable_data_ptr<acc_t>());
  num.copy_(total.narrow(1, 0, m * c).view({p.batch(), m, c}));
  key_num.copy_(total.narrow(1, m * c, m * kd).view({p.batch(), m, kd}));
  den.copy_(total.narrow(1, m * (c + kd), m));
}

template <typename scalar_t>
void backward_impl(const ClusterProblem& p, const at::Tensor& grad_num,
                   const at::Tensor& grad_den, const at::Tensor& grad_key_num,
                   at::Tensor& grad_keys, at::Tensor& grad_queries, at::Tensor& grad_values,
                   at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const Chunks chunks(p.images());
  const int64_t m = p.centers();
  const int64_t d = p.key_dim();
  const int64_t c = p.value_dim();
  const int64_t kd = grad_key_num.size(2);
  // One row per task: [grad_queries (M x D) | grad_bias (M)].
  const int64_t row = m * (d + 1);
  const int64_t tasks = p.batch() * chunks.count;
  at::Tensor partial = at::zeros({tasks, row}, grad_queries.options());
  acc_t* part = partial.mutable_data_ptr<acc_t>();
  const acc_t* g_num = grad_num.const_data_ptr<acc_t>();
  const acc_t* g_den = grad_den.const_data_ptr<acc_t>();
  const acc_t* g_key = grad_key_num.const_data_ptr<acc_t>();
  scalar_t* dk_all = grad_keys.mutable_data_ptr<scalar_t>();
  scalar_t* dv_all = grad_values.mutable_data_ptr<scalar_t>();
  const int64_t n = p.images();
  for_each_chunk(p, chunks, [&](int64_t task, int64_t b, int64_t begin, int64_t end) {
    const Probe<scalar_t, acc_t> probe(p, b);
    const acc_t* gn = g_num + b * m * c;
    const acc_t* gd = g_den + b * m;
    const acc_t* gk = g_key + b * m * kd;
    acc_t* t_dq = part + task * row;
    acc_t* t_db = t_dq + m * d;
    Block<scalar_t, acc_t> block(m);
    std::vector<acc_t> da(m * kBlock), key_da(m * kBlock), dl(m * kBlock), dk(d), dv(c);
    for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
      const int64_t count = std::min(kBlock, end - i0);
      block.load(probe, i0, count);
      const acc_t* a = block.a.data();
      // dA = dnum v_hat^T + dkey_num k^T + dden; dL = A * (dA - sum_M A dA) * scale.
      block_dots(block.v, count, gn, c, m, da.data());
      if (kd > 0) {
        block_dots(block.k, count, gk, kd, m, key_da.data());
      }
      for (int64_t i = 0; i < count; ++i) {
        acc_t mean = 0;
        for (int64_t j = 0; j < m; ++j) {
          acc_t& daj = da[j * kBlock + i];
          daj = block.r[i] * daj + gd[j] + (kd > 0 ? key_da[j * kBlock + i] : acc_t(0));
          mean += a[j * kBlock + i] * daj;
        }
        for (int64_t j = 0; j < m; ++j) {
          dl[j * kBlock + i] = a[j * kBlock + i] * (da[j * kBlock + i] - mean) * probe.scale;
          t_db[j] += dl[j * kBlock + i];
        }
      }
      accumulate_rows(dl.data(), block.k, d, count, m, t_dq);
      for (int64_t i = 0; i < count; ++i) {
        combine(dl.data() + i, kBlock, probe.queries, d, m, false, dk.data());
        if (kd > 0) {
          combine(a + i, kBlock, gk, kd, m, true, dk.data());
        }
        store_cast(dk.data(), d, dk_all + (b * n + i0 + i) * d);
        combine(a + i, kBlock, gn, c, m, false, dv.data());
        // d(v / (|v| + eps)) = r dv - v (v . dv) r^2 / |v|; the radial term vanishes at v = 0.
        const acc_t r = block.r[i];
        const acc_t* v = block.v + i * c;
        acc_t radial = 0;
        if (probe.normalize) {
          const acc_t norm = acc_t(1) / r - static_cast<acc_t>(kNormEps);
          radial = norm > 0 ? dot(v, dv.data(), c) * r * r / norm : acc_t(0);
        }
        store_value_grad(dv.data(), v, r, radial, c, dv_all + (b * n + i0 + i) * c);
      }
    }
  });
  const int64_t groups = p.shared_queries() ? 1 : p.batch();
  at::Tensor total = at::empty({groups, row}, grad_queries.options());
  reduce_in_order(part, groups, tasks / groups, row, total.mutable_data_ptr<acc_t>());
  grad_queries.copy_(total.narrow(1, 0, m * d).view(grad_queries.sizes()));
  grad_bias.copy_(total.narrow(1, m * d, m));
}

void forward_kernel(const ClusterProblem& p, at::Tensor& num, at::Tensor& den,
                    at::Tensor& key_num) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.keys.scalar_type(),
                                  "cluster_accumulate_cpu",
                                  [&] { forward_impl<scalar_t>(p, num, den, key_num); });
}

void backward_kernel(const ClusterProblem& p, const at::Tensor& grad_num,
                     const at::Tensor& grad_den, const at::Tensor& grad_key_num,
                     at::Tensor& grad_keys, at::Tensor& grad_queries, at::Tensor& grad_values,
                     at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.keys.scalar_type(), "cluster_accumulate_backward_cpu", [&] {
        backward_impl<scalar_t>(p, grad_num, grad_den, grad_key_num, grad_keys, grad_queries,
                                grad_values, grad_bias);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedset, CPU, m) {
  m.impl("cluster_accumulate",
         [](const at::Tensor& keys, const at::Tensor& queries, const at::Tensor& values,
            double scale, const std::optional<at::Tensor>& query_bias, bool normalize_values,
            bool keys_as_values) {
           return cluster_accumulate_forward(keys, queries, values, scale, query_bias,
                                             normalize_values, keys_as_values, forward_kernel);
         });
  m.impl("cluster_accumulate_backward",
         [](const at::Tensor& grad_num, const at::Tensor& grad_den,
            const at::Tensor& grad_key_num, const at::Tensor& keys, const at::Tensor& queries,
            const at::Tensor& values, double scale, const std::optional<at::Tensor>& query_bias,
            bool normalize_values, bool keys_as_values) {
           return cluster_accumulate_backward(grad_num, grad_den, grad_key_num, keys, queries,
                                              values, scale, query_bias, normalize_values,
                                              keys_as_values, backward_kernel);
         });
}

}  // namespace fusedset
