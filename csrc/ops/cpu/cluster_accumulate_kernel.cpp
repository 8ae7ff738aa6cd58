// cluster_accumulate CPU kernels. M is tiny and N huge, so the work is a stream over the images:
// each task owns a chunk of one probe's images, walks it in blocks of kBlock, keeps the M x kBlock
// assignment on the stack and folds it into per-task partial sums. The partials are then added in
// chunk order, so the result depends on the shapes only, never on the thread count or schedule.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/cluster_accumulate.h"

namespace fusedset {
namespace {

constexpr int64_t kBlock = 64;
// A chunk is at least kMinChunk images and a probe has at most kMaxChunks of them: enough tasks
// to keep the cores busy at B = 1, and partial buffers whose size does not grow with N.
constexpr int64_t kMinChunk = 256;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kLanes = 8;
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

// Independent partial sums break the add dependency chain so the loop vectorizes.
template <typename acc_t, typename Term>
acc_t lane_sum(int64_t n, const Term& term) {
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      part[l] += term(i + l);
    }
  }
  acc_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    total += part[l];
  }
  for (; i < n; ++i) {
    total += term(i);
  }
  return total;
}

template <typename scalar_t, typename acc_t>
acc_t dot(const scalar_t* x, const acc_t* y, int64_t n) {
  return lane_sum<acc_t>(n, [=](int64_t i) { return static_cast<acc_t>(x[i]) * y[i]; });
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

  const scalar_t* key(int64_t i) const { return keys + i * d; }
  const scalar_t* value(int64_t i) const { return values + i * c; }

  // The softmax over centers of image i into a[0..m), and the factor its value row enters
  // with: 1 / (||v|| + eps) when values are normalized, else 1.
  acc_t assign(int64_t i, acc_t* a) const {
    const scalar_t* k = key(i);
    acc_t top = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < m; ++j) {
      a[j] = (dot(k, queries + j * d, d) + bias[j]) * scale;
      top = std::max(top, a[j]);
    }
    acc_t total = 0;
    for (int64_t j = 0; j < m; ++j) {
      a[j] = std::exp(a[j] - top);
      total += a[j];
    }
    for (int64_t j = 0; j < m; ++j) {
      a[j] /= total;
    }
    if (!normalize) {
      return acc_t(1);
    }
    const scalar_t* v = value(i);
    const acc_t sq = lane_sum<acc_t>(c, [=](int64_t t) {
      const acc_t x = static_cast<acc_t>(v[t]);
      return x * x;
    });
    return acc_t(1) / (std::sqrt(sq) + static_cast<acc_t>(kNormEps));
  }
};

// acc (M x cols) += w (M x kBlock, columns 0..count) @ rows (count x cols). Four rows per sweep
// of acc: a quarter of the loads and stores of acc, which would otherwise bound the loop.
template <typename scalar_t, typename acc_t>
void accumulate_rows(const acc_t* w, const scalar_t* rows, int64_t cols, int64_t count,
                     int64_t m, acc_t* acc) {
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) {
    const scalar_t* r0 = rows + i * cols;
    const scalar_t* r1 = r0 + cols;
    const scalar_t* r2 = r1 + cols;
    const scalar_t* r3 = r2 + cols;
    for (int64_t j = 0; j < m; ++j) {
      const acc_t* wj = w + j * kBlock + i;
      const acc_t w0 = wj[0], w1 = wj[1], w2 = wj[2], w3 = wj[3];
      acc_t* a = acc + j * cols;
      for (int64_t t = 0; t < cols; ++t) {
        a[t] += w0 * static_cast<acc_t>(r0[t]) + w1 * static_cast<acc_t>(r1[t]) +
                w2 * static_cast<acc_t>(r2[t]) + w3 * static_cast<acc_t>(r3[t]);
      }
    }
  }
  for (; i < count; ++i) {
    const scalar_t* r = rows + i * cols;
    for (int64_t j = 0; j < m; ++j) {
      const acc_t wj = w[j * kBlock + i];
      acc_t* a = acc + j * cols;
      for (int64_t t = 0; t < cols; ++t) {
        a[t] += wj * static_cast<acc_t>(r[t]);
      }
    }
  }
}

// Runs body(task, b, begin, end) for every (probe, chunk) task in parallel.
template <typename Body>
void for_each_chunk(const ClusterProblem& p, const Chunks& chunks, const Body& body) {
  const int64_t n = p.images();
  at::parallel_for(0, p.batch() * chunks.count, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / chunks.count;
      const int64_t begin = std::min(n, (task % chunks.count) * chunks.size);
      body(task, b, begin, std::min(n, begin + chunks.size));
    }
  });
}

// out[g] = sum over k of partial[first(g) + k * stride] rows of length len, k in order.
template <typename acc_t>
void reduce_in_order(const acc_t* partial, int64_t groups, int64_t terms, int64_t len,
                     acc_t* out) {
  at::parallel_for(0, groups, 1, [&](int64_t first, int64_t last) {
    for (int64_t g = first; g < last; ++g) {
      acc_t* dst = out + g * len;
      std::fill(dst, dst + len, acc_t(0));
      for (int64_t k = 0; k < terms; ++k) {
        const acc_t* src = partial + (g * terms + k) * len;
        for (int64_t t = 0; t < len; ++t) {
          dst[t] += src[t];
        }
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
    std::vector<acc_t> a(m * kBlock), av(m * kBlock), col(m);
    for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
      const int64_t count = std::min(kBlock, end - i0);
      for (int64_t i = 0; i < count; ++i) {
        const acc_t r = probe.assign(i0 + i, col.data());
        for (int64_t j = 0; j < m; ++j) {
          a[j * kBlock + i] = col[j];
          av[j * kBlock + i] = col[j] * r;
        }
      }
      accumulate_rows(av.data(), probe.value(i0), c, count, m, t_num);
      if (kd > 0) {
        accumulate_rows(a.data(), probe.key(i0), kd, count, m, t_key);
      }
      for (int64_t j = 0; j < m; ++j) {
        for (int64_t i = 0; i < count; ++i) {
          t_den[j] += a[j * kBlock + i];
        }
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
    std::vector<acc_t> a(m), da(m), dk(d), dv(c);
    for (int64_t i = begin; i < end; ++i) {
      const acc_t r = probe.assign(i, a.data());
      const scalar_t* k = probe.key(i);
      const scalar_t* v = probe.value(i);
      // dA = dnum v_hat^T + dkey_num k^T + dden; dL = A * (dA - sum_M A dA) * scale.
      acc_t mean = 0;
      for (int64_t j = 0; j < m; ++j) {
        da[j] = r * dot(v, gn + j * c, c) + gd[j];
        if (kd > 0) {
          da[j] += dot(k, gk + j * kd, kd);
        }
        mean += a[j] * da[j];
      }
      std::fill(dk.begin(), dk.end(), acc_t(0));
      std::fill(dv.begin(), dv.end(), acc_t(0));
      for (int64_t j = 0; j < m; ++j) {
        const acc_t dl = a[j] * (da[j] - mean) * probe.scale;
        const acc_t* q = probe.queries + j * d;
        for (int64_t t = 0; t < d; ++t) {
          dk[t] += dl * q[t];
        }
        if (kd > 0) {
          const acc_t* g = gk + j * kd;
          for (int64_t t = 0; t < kd; ++t) {
            dk[t] += a[j] * g[t];
          }
        }
        acc_t* dq = t_dq + j * d;
        for (int64_t t = 0; t < d; ++t) {
          dq[t] += dl * static_cast<acc_t>(k[t]);
        }
        t_db[j] += dl;
        const acc_t* g = gn + j * c;
        for (int64_t t = 0; t < c; ++t) {
          dv[t] += a[j] * g[t];
        }
      }
      scalar_t* dk_out = dk_all + (b * n + i) * d;
      for (int64_t t = 0; t < d; ++t) {
        dk_out[t] = static_cast<scalar_t>(dk[t]);
      }
      scalar_t* dv_out = dv_all + (b * n + i) * c;
      // d(v / (|v| + eps)) = r dv - v (v . dv) r^2 / |v|; the radial term vanishes at v = 0.
      acc_t radial = 0;
      if (probe.normalize) {
        const acc_t norm = acc_t(1) / r - static_cast<acc_t>(kNormEps);
        radial = norm > 0 ? dot(v, dv.data(), c) * r * r / norm : acc_t(0);
      }
      for (int64_t t = 0; t < c; ++t) {
        dv_out[t] = static_cast<scalar_t>(r * dv[t] - radial * static_cast<acc_t>(v[t]));
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
