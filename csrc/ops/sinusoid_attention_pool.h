#pragma once
// sinusoid_attention_pool: softmax attention of R queries over the N rows of a set, where row
// i is the value and row i plus a LayerNorm'd sinusoidal code of a position p_i is the key
// (FaceCoresetNet's cross-attention with its norm encoding, key projection folded into the
// queries). The shared host half (checks, layout, allocation) lives in
// sinusoid_attention_pool.cpp; a backend supplies the kernel.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fusedset {

// What the kernel reads. x keeps the input dtype; the rest is in the accumulation dtype
// (float64 for float64 x, else float32), contiguous.
struct SinusoidPoolProblem {
  at::Tensor x;                 // (B, N, C): row i of template b enters as row_scale[b, i] x_i
  at::Tensor queries;           // (B, R, C)
  at::Tensor position_queries;  // (B, R, D), channels reordered [sines (D/2) | cosines (D/2)]
  at::Tensor query_totals;      // (B, R): sum over channels of position_queries
  at::Tensor positions;         // (B, N)
  at::Tensor divisors;          // (D/2): channel pair k is sin, cos of p * position_scale / d_k
  at::Tensor row_scale;         // (B, N), or undefined for 1
  at::Tensor lengths;           // (B,) int64 in [1, N]: rows at or past lengths[b] are padding
  double position_scale;
  double eps;   // the LayerNorm's variance epsilon
  bool series;  // small-angle channel pairs may be summed as power series (float kernels)

  int64_t batch() const { return x.size(0); }
  int64_t rows() const { return x.size(1); }
  int64_t width() const { return x.size(2); }
  int64_t num_queries() const { return queries.size(1); }
  int64_t code_width() const { return position_queries.size(2); }
};

// pooled (B, R, C) and logsumexp (B, R), accumulation dtype.
using SinusoidPoolKernel = void (*)(const SinusoidPoolProblem& p, at::Tensor& pooled,
                                    at::Tensor& logsumexp);

std::tuple<at::Tensor, at::Tensor> sinusoid_attention_pool_forward(
    const at::Tensor& x, const at::Tensor& queries, const at::Tensor& position_queries,
    const at::Tensor& positions, const at::Tensor& divisors, double position_scale, double eps,
    const std::optional<at::Tensor>& row_scale, const std::optional<at::Tensor>& lengths,
    bool series, SinusoidPoolKernel kernel);

}  // namespace fusedset
