#pragma once
// sinusoid_attention_pool: softmax attention of R queries over the N rows of a set, where row
// i is the value and row i plus a LayerNorm'd sinusoidal code of a position p_i is the key
// (FaceCoresetNet's cross-attention with its norm encoding, key projection folded into the
// queries). The shared host half (checks, layout, allocation) lives in
// sinusoid_attention_pool.cpp; a backend supplies the kernel.
#include <ATen/core/Tensor.h>

#include <array>
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

// What the backward kernel reads besides the problem (accumulation dtype, contiguous): the
// gradient of pooled (B, R, C), the forward's logsumexp (B, R), and per query
// offset_r = grad_logsumexp_r - grad_pooled_r . pooled_r, so that the score gradient of row i
// is a_ir (grad_pooled_r . v_i + offset_r).
struct SinusoidPoolGradInputs {
  at::Tensor grad_pooled;
  at::Tensor logsumexp;
  at::Tensor offsets;
};

// The gradients the backward kernel writes, each undefined when not wanted: x (B, N, C) in x's
// dtype; the rest in the accumulation dtype, position_queries (B, R, D) in the caller's channel
// order (sin, cos interleaved). Rows at or past lengths[b] get zeros.
struct SinusoidPoolGradients {
  at::Tensor x;
  at::Tensor queries;
  at::Tensor position_queries;
  at::Tensor positions;
  at::Tensor row_scale;
};

using SinusoidPoolBackwardKernel = void (*)(const SinusoidPoolProblem& p,
                                            const SinusoidPoolGradInputs& in,
                                            SinusoidPoolGradients& out);

std::tuple<at::Tensor, at::Tensor> sinusoid_attention_pool_forward(
    const at::Tensor& x, const at::Tensor& queries, const at::Tensor& position_queries,
    const at::Tensor& positions, const at::Tensor& divisors, double position_scale, double eps,
    const std::optional<at::Tensor>& row_scale, const std::optional<at::Tensor>& lengths,
    bool series, SinusoidPoolKernel kernel);

// The gradients for x, queries, position_queries, positions and row_scale, each in its input's
// dtype, or an empty tensor where output_mask is false (or row_scale is absent).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sinusoid_attention_pool_backward(
    const at::Tensor& grad_pooled, const at::Tensor& grad_logsumexp, const at::Tensor& pooled,
    const at::Tensor& logsumexp, const at::Tensor& x, const at::Tensor& queries,
    const at::Tensor& position_queries, const at::Tensor& positions, const at::Tensor& divisors,
    double position_scale, double eps, const std::optional<at::Tensor>& row_scale,
    const std::optional<at::Tensor>& lengths, bool series, std::array<bool, 5> output_mask,
    SinusoidPoolBackwardKernel kernel);

}  // namespace fusedset
