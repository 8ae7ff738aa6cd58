#include "ops/sinusoid_attention_pool.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/lengths.h"

namespace fusedset {
namespace {

constexpr const char* kOp = "sinusoid_attention_pool";

void check_float(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", x on ",
              x.device());
}

SinusoidPoolProblem make_problem(const char* op, const at::Tensor& x, const at::Tensor& queries,
                                 const at::Tensor& position_queries, const at::Tensor& positions,
                                 const at::Tensor& divisors, double position_scale, double eps,
                                 const std::optional<at::Tensor>& row_scale,
                                 const std::optional<at::Tensor>& lengths, bool series) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) >= 1, op, ": x must have shape (B, N >= 1, C), got ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  const int64_t batch = x.size(0);
  const int64_t n = x.size(1);
  TORCH_CHECK(queries.dim() == 3 && queries.size(0) == batch && queries.size(1) >= 1 &&
                  queries.size(2) == x.size(2),
              op, ": queries must have shape (", batch, ", R >= 1, ", x.size(2), "), got ",
              queries.sizes());
  TORCH_CHECK(divisors.dim() == 1 && divisors.size(0) >= 1, op,
              ": divisors must have shape (D / 2 >= 1,), got ", divisors.sizes());
  TORCH_CHECK(position_queries.dim() == 3 && position_queries.size(0) == batch &&
                  position_queries.size(1) == queries.size(1) &&
                  position_queries.size(2) == 2 * divisors.size(0),
              op, ": position_queries must have shape (", batch, ", ", queries.size(1), ", ",
              2 * divisors.size(0), "), got ", position_queries.sizes());
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == batch && positions.size(1) == n, op,
              ": positions must have shape (", batch, ", ", n, "), got ", positions.sizes());
  TORCH_CHECK(std::isfinite(position_scale), op, ": position_scale must be finite, got ",
              position_scale);
  TORCH_CHECK(eps > 0 && std::isfinite(eps), op, ": eps must be positive, got ", eps);
  check_float(op, "queries", queries, x);
  check_float(op, "position_queries", position_queries, x);
  check_float(op, "positions", positions, x);
  check_float(op, "divisors", divisors, x);
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  SinusoidPoolProblem p;
  p.x = x.contiguous();
  p.queries = queries.to(acc).contiguous();
  const at::Tensor code_queries = position_queries.to(acc);
  p.position_queries = at::cat({code_queries.slice(2, 0, c10::nullopt, 2),
                                code_queries.slice(2, 1, c10::nullopt, 2)},
                               2)
                           .contiguous();
  p.query_totals = code_queries.sum(2).contiguous();
  p.positions = positions.to(acc).contiguous();
  p.divisors = divisors.to(acc).contiguous();
  if (row_scale.has_value()) {
    const at::Tensor& s = *row_scale;
    TORCH_CHECK(s.dim() == 2 && s.size(0) == batch && s.size(1) == n, op,
                ": row_scale must have shape (", batch, ", ", n, "), got ", s.sizes());
    check_float(op, "row_scale", s, x);
    p.row_scale = s.to(acc).contiguous();
  }
  p.lengths = checked_lengths(op, lengths, batch, n, 1, " (a softmax needs at least one row)");
  p.position_scale = position_scale;
  p.eps = eps;
  p.series = series;
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sinusoid_attention_pool_forward(
    const at::Tensor& x, const at::Tensor& queries, const at::Tensor& position_queries,
    const at::Tensor& positions, const at::Tensor& divisors, double position_scale, double eps,
    const std::optional<at::Tensor>& row_scale, const std::optional<at::Tensor>& lengths,
    bool series, SinusoidPoolKernel kernel) {
  const SinusoidPoolProblem p = make_problem(kOp, x, queries, position_queries, positions,
                                             divisors, position_scale, eps, row_scale, lengths,
                                             series);
  at::Tensor pooled = at::empty({p.batch(), p.num_queries(), p.width()}, p.queries.options());
  at::Tensor logsumexp = at::empty({p.batch(), p.num_queries()}, p.queries.options());
  if (p.batch() > 0) {
    kernel(p, pooled, logsumexp);
  }
  return {pooled, logsumexp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sinusoid_attention_pool_backward(
    const at::Tensor& grad_pooled, const at::Tensor& grad_logsumexp, const at::Tensor& pooled,
    const at::Tensor& logsumexp, const at::Tensor& x, const at::Tensor& queries,
    const at::Tensor& position_queries, const at::Tensor& positions, const at::Tensor& divisors,
    double position_scale, double eps, const std::optional<at::Tensor>& row_scale,
    const std::optional<at::Tensor>& lengths, bool series, std::array<bool, 5> output_mask,
    SinusoidPoolBackwardKernel kernel) {
  const char* op = "sinusoid_attention_pool_backward";
  const SinusoidPoolProblem p = make_problem(op, x, queries, position_queries, positions,
                                             divisors, position_scale, eps, row_scale, lengths,
                                             series);
  const at::IntArrayRef pooled_shape = p.queries.sizes();
  const auto check_output = [&](const char* name, const at::Tensor& t, at::IntArrayRef shape) {
    TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
                      t.sizes());
    check_float(op, name, t, x);
  };
  check_output("grad_pooled", grad_pooled, pooled_shape);
  check_output("pooled", pooled, pooled_shape);
  check_output("grad_logsumexp", grad_logsumexp, pooled_shape.slice(0, 2));
  check_output("logsumexp", logsumexp, pooled_shape.slice(0, 2));
  const at::ScalarType acc = p.queries.scalar_type();
  SinusoidPoolGradInputs in;
  in.grad_pooled = grad_pooled.to(acc).contiguous();
  in.logsumexp = logsumexp.to(acc).contiguous();
  in.offsets = (grad_logsumexp.to(acc) - (in.grad_pooled * pooled.to(acc)).sum(2)).contiguous();
  const at::IntArrayRef per_row = p.positions.sizes();
  SinusoidPoolGradients out;
  if (output_mask[0]) {
    out.x = at::empty(p.x.sizes(), p.x.options());
  }
  if (output_mask[1]) {
    out.queries = at::empty(p.queries.sizes(), p.queries.options());
  }
  if (output_mask[2]) {
    out.position_queries = at::empty(position_queries.sizes(), p.queries.options());
  }
  if (output_mask[3]) {
    out.positions = at::empty(per_row, p.queries.options());
  }
  if (output_mask[4] && row_scale.has_value()) {
    out.row_scale = at::empty(per_row, p.queries.options());
  }
  const bool any = out.x.defined() || out.queries.defined() ||
                   out.position_queries.defined() || out.positions.defined() ||
                   out.row_scale.defined();
  if (p.batch() > 0 && any) {
    kernel(p, in, out);
  }
  // Each gradient in its input's dtype; an unwanted one as an empty tensor (a schema's outputs
  // cannot be None).
  const auto as_input = [](const at::Tensor& grad, const at::Tensor& input) {
    return grad.defined() ? grad.to(input.scalar_type()) : at::empty({0}, input.options());
  };
  return {as_input(out.x, x), as_input(out.queries, queries),
          as_input(out.position_queries, position_queries), as_input(out.positions, positions),
          as_input(out.row_scale, row_scale.has_value() ? *row_scale : x)};
}

TORCH_LIBRARY_FRAGMENT(fusedset, m) {
  m.def(
      "sinusoid_attention_pool(Tensor x, Tensor queries, Tensor position_queries, "
      "Tensor positions, Tensor divisors, float position_scale, float eps, "
      "Tensor? row_scale=None, Tensor? lengths=None, bool series=True) "
      "-> (Tensor pooled, Tensor logsumexp)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "sinusoid_attention_pool_backward(Tensor grad_pooled, Tensor grad_logsumexp, "
      "Tensor pooled, Tensor logsumexp, Tensor x, Tensor queries, Tensor position_queries, "
      "Tensor positions, Tensor divisors, float position_scale, float eps, "
      "Tensor? row_scale, Tensor? lengths, bool series, bool[5] output_mask) "
      "-> (Tensor grad_x, Tensor grad_queries, Tensor grad_position_queries, "
      "Tensor grad_positions, Tensor grad_row_scale)",
      {at::Tag::pt2_compliant_tag});
}

}  // namespace fusedset
