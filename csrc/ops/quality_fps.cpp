#include "ops/quality_fps.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "ops/lengths.h"

namespace fusedset {
namespace {

at::ScalarType accumulation_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

QualityFpsProblem make_problem(const char* op, const at::Tensor& x, const at::Tensor& gamma,
                               int64_t k, const std::optional<at::Tensor>& lengths) {
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape (B, N, C), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(k >= 1, op, ": k must be at least 1, got ", k);
  TORCH_CHECK(gamma.numel() == 1 && at::isFloatingType(gamma.scalar_type()), op,
              ": gamma must be a float or a one-element float tensor, got ", gamma.sizes());
  const double g = gamma.item<double>();
  TORCH_CHECK(std::isfinite(g), op, ": gamma must be finite, got ", g);
  QualityFpsProblem p;
  p.x = x.contiguous();
  p.gamma = g;
  p.steps = std::min<int64_t>(k, x.size(1));
  p.scale = 1.0;
  const int64_t batch = x.size(0);
  p.lengths = checked_lengths(op, lengths, batch, x.size(1), 0, "");
  p.indices = at::empty({batch, p.steps}, x.options().dtype(at::kLong));
  return p;
}

}  // namespace

at::Tensor quality_fps_forward(const at::Tensor& x, const at::Tensor& gamma, int64_t k,
                               const std::optional<at::Tensor>& lengths,
                               const std::optional<at::Tensor>& row_scale,
                               QualityFpsKernel kernel) {
  QualityFpsProblem p = make_problem("quality_fps", x, gamma, k, lengths);
  if (row_scale.has_value()) {
    const at::Tensor& s = *row_scale;
    TORCH_CHECK(s.dim() == 2 && s.size(0) == x.size(0) && s.size(1) == x.size(1),
                "quality_fps: row_scale must have shape (", x.size(0), ", ", x.size(1),
                "), got ", s.sizes());
    TORCH_CHECK(at::isFloatingType(s.scalar_type()),
                "quality_fps: row_scale must be a floating-point tensor, got ", s.scalar_type());
    TORCH_CHECK(s.device() == x.device(), "quality_fps: row_scale is on ", s.device(), ", x on ",
                x.device());
    p.row_scale = s.to(accumulation_type(x)).contiguous();
  }
  if (p.indices.numel() > 0) {
    kernel(p);
  }
  return p.indices;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quality_fps_select_forward(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& noise, double scale,
    double tau, int64_t k, const std::optional<at::Tensor>& lengths, QualityFpsKernel kernel) {
  QualityFpsProblem p = make_problem("quality_fps_select", x, gamma, k, lengths);
  TORCH_CHECK_VALUE(tau > 0 && std::isfinite(tau),
                    "quality_fps_select: tau must be positive, got ", tau);
  TORCH_CHECK(std::isfinite(scale), "quality_fps_select: scale must be finite, got ", scale);
  const int64_t batch = x.size(0);
  const int64_t n = x.size(1);
  TORCH_CHECK(noise.dim() == 3 && noise.size(0) == batch && noise.size(1) == p.steps &&
                  noise.size(2) == n,
              "quality_fps_select: noise must have shape (", batch, ", ", p.steps, ", ", n,
              "), got ", noise.sizes());
  const at::ScalarType acc = accumulation_type(x);
  p.noise = noise.to(acc).contiguous();
  p.scale = scale;
  p.logits = at::empty({batch, p.steps, n}, x.options().dtype(acc));
  p.source = at::empty({batch, p.steps, n}, x.options().dtype(at::kInt));
  if (p.indices.numel() > 0) {
    kernel(p);
  }
  const int64_t channels = x.size(2);
  at::Tensor rows = p.x.gather(
      1, p.indices.clamp_min(0).unsqueeze(-1).expand({batch, p.steps, channels}));
  rows.masked_fill_(p.indices.lt(0).unsqueeze(-1), 0);
  return {rows, p.indices, p.logits, p.source};
}

std::tuple<at::Tensor, at::Tensor> quality_fps_backward_dots(const at::Tensor& x,
                                                             const at::Tensor& m,
                                                             QualityFpsDotsKernel kernel) {
  TORCH_CHECK(x.dim() == 3 && m.dim() == 3 && m.size(0) == x.size(0) && m.size(2) == x.size(2),
              "quality_fps_backward_dots: x (B, N, C) and m (B, M, C) expected, got ", x.sizes(),
              " and ", m.sizes());
  const at::ScalarType acc = accumulation_type(x);
  TORCH_CHECK(m.scalar_type() == acc, "quality_fps_backward_dots: m must be ", acc, ", got ",
              m.scalar_type());
  at::Tensor dots = at::empty({x.size(0), x.size(1), m.size(1)}, x.options().dtype(acc));
  at::Tensor q = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc));
  if (x.numel() > 0) {
    kernel(x.contiguous(), m.contiguous(), dots, q);
  } else {
    dots.zero_();
    q.zero_();
  }
  return {dots, q};
}

std::tuple<at::Tensor, at::Tensor> quality_fps_backward_spread(const at::Tensor& x,
                                                               const at::Tensor& coef,
                                                               const at::Tensor& beta,
                                                               const at::Tensor& x_picked,
                                                               QualityFpsSpreadKernel kernel) {
  const at::ScalarType acc = accumulation_type(x);
  TORCH_CHECK(x.dim() == 3 && coef.dim() == 2 && beta.dim() == 3 && x_picked.dim() == 3 &&
                  coef.size(0) == x.size(0) && coef.size(1) == x.size(1) &&
                  beta.size(0) == x.size(0) && beta.size(1) == x.size(1) &&
                  x_picked.size(0) == x.size(0) && x_picked.size(1) == beta.size(2) &&
                  x_picked.size(2) == x.size(2),
              "quality_fps_backward_spread: shapes x (B, N, C), coef (B, N), beta (B, N, K), "
              "x_picked (B, K, C) expected, got ",
              x.sizes(), ", ", coef.sizes(), ", ", beta.sizes(), ", ", x_picked.sizes());
  TORCH_CHECK(coef.scalar_type() == acc && beta.scalar_type() == acc &&
                  x_picked.scalar_type() == acc,
              "quality_fps_backward_spread: coef, beta and x_picked must be ", acc);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor into = at::zeros({x.size(0), beta.size(2), x.size(2)}, x.options().dtype(acc));
  if (x.numel() > 0) {
    kernel(x.contiguous(), coef.contiguous(), beta.contiguous(), x_picked.contiguous(), dx, into);
  }
  return {dx, into};
}

TORCH_LIBRARY_FRAGMENT(fusedset, m) {
  m.def(
      "quality_fps(Tensor x, int k, Tensor gamma, Tensor? lengths=None, "
      "Tensor? row_scale=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "quality_fps_select(Tensor x, int k, Tensor gamma, float tau, float scale, Tensor noise, "
      "Tensor? lengths=None) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def("quality_fps_backward_dots(Tensor x, Tensor m) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "quality_fps_backward_spread(Tensor x, Tensor coef, Tensor beta, Tensor x_picked) -> "
      "(Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

}  // namespace fusedset
