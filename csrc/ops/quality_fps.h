#pragma once
// quality_fps: FaceCoresetNet's quality-aware farthest-point sampling over (B, N, C) templates.
// The shared host half (checks, allocation) lives in quality_fps.cpp; a backend supplies one
// kernel that runs every selection step.
#include <ATen/core/Tensor.h>

#include <tuple>

namespace fusedset {

struct QualityFpsProblem {
  at::Tensor x;        // (B, N, C) contiguous, float16/bfloat16/float32/float64
  double gamma;        // exponent of the norm in the distance
  int64_t steps;       // min(k, N)
  at::Tensor lengths;  // (B,) int64 in [0, N]: rows at or past lengths[b] are padding
  // (B, N) in the accumulation dtype, or undefined: row i of template b is row_scale[b, i] x_i
  // (the selection of x * row_scale[..., None] without building it).
  at::Tensor row_scale;
  at::Tensor noise;    // (B, steps, N) in the accumulation dtype, or undefined (no noise)
  double scale;        // the pick maximizes d * scale + noise
  at::Tensor indices;  // out (B, steps) int64, -1 once nothing is left to pick
  at::Tensor logits;   // out (B, steps, N) d_t (-inf where unavailable), or undefined
  at::Tensor source;   // out (B, steps, N) int32: the pick whose distance is d_t (-1 at t = 0)
};

using QualityFpsKernel = void (*)(QualityFpsProblem& problem);

// Indices (B, min(k, N)) of the deterministic selection.
at::Tensor quality_fps_forward(const at::Tensor& x, const at::Tensor& gamma, int64_t k,
                               const std::optional<at::Tensor>& lengths,
                               const std::optional<at::Tensor>& row_scale,
                               QualityFpsKernel kernel);

// (rows, indices, logits, source) of the noisy selection the training form differentiates.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quality_fps_select_forward(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& noise, double scale,
    double tau, int64_t k, const std::optional<at::Tensor>& lengths, QualityFpsKernel kernel);

// The two sweeps over X of the select backward (fusedset/ops/quality_fps.py composes them):
// dots (B, N, M) = x m^T and q (B, N) = ||x_i||, both in the accumulation dtype ...
using QualityFpsDotsKernel = void (*)(const at::Tensor& x, const at::Tensor& m, at::Tensor& dots,
                                      at::Tensor& q);
// ... and dx = coef * x + beta x_picked (x's dtype), into = beta^T x (accumulation dtype); a row
// whose coef and beta are all zero counts as zero, so padding is never read as a number.
using QualityFpsSpreadKernel = void (*)(const at::Tensor& x, const at::Tensor& coef,
                                        const at::Tensor& beta, const at::Tensor& x_picked,
                                        at::Tensor& dx, at::Tensor& into);

std::tuple<at::Tensor, at::Tensor> quality_fps_backward_dots(const at::Tensor& x,
                                                             const at::Tensor& m,
                                                             QualityFpsDotsKernel kernel);
std::tuple<at::Tensor, at::Tensor> quality_fps_backward_spread(const at::Tensor& x,
                                                               const at::Tensor& coef,
                                                               const at::Tensor& beta,
                                                               const at::Tensor& x_picked,
                                                               QualityFpsSpreadKernel kernel);

}  // namespace fusedset
