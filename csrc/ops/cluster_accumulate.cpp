#include "ops/cluster_accumulate.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace fusedset {
namespace {

at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& keys) {
  TORCH_CHECK(t.scalar_type() == keys.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " differs from keys dtype ", keys.scalar_type());
  TORCH_CHECK(t.device() == keys.device(), op, ": ", name, " is on ", t.device(),
              ", keys on ", keys.device());
}

ClusterProblem make_problem(const char* op, const at::Tensor& keys, const at::Tensor& queries,
                            const at::Tensor& values, double scale,
                            const std::optional<at::Tensor>& query_bias, bool normalize_values,
                            bool keys_as_values) {
  TORCH_CHECK(keys.dim() == 3, op, ": keys must have shape (B, N, D), got ", keys.sizes());
  TORCH_CHECK(at::isFloatingType(keys.scalar_type()),
              op, ": keys must be float16, bfloat16, float32 or float64, got ",
              keys.scalar_type());
  TORCH_CHECK(queries.dim() == 3 && (queries.size(0) == 1 || queries.size(0) == keys.size(0)) &&
                  queries.size(1) >= 1 && queries.size(2) == keys.size(2),
              op, ": queries must have shape (1 or ", keys.size(0), ", M >= 1, ", keys.size(2),
              "), got ", queries.sizes());
  TORCH_CHECK(values.dim() == 3 && values.size(0) == keys.size(0) &&
                  values.size(1) == keys.size(1),
              op, ": values must have shape (", keys.size(0), ", ", keys.size(1), ", C), got ",
              values.sizes());
  check_same(op, "queries", queries, keys);
  check_same(op, "values", values, keys);
  const at::ScalarType acc = accumulation_type(keys.scalar_type());
  ClusterProblem p;
  p.keys = keys.contiguous();
  p.values = values.contiguous();
  p.queries = queries.to(acc).contiguous();
  if (query_bias.has_value()) {
    const at::Tensor& bias = *query_bias;
    TORCH_CHECK(bias.dim() == 2 && bias.size(0) == queries.size(0) &&
                    bias.size(1) == queries.size(1),
                op, ": query_bias must have shape (", queries.size(0), ", ", queries.size(1),
                "), got ", bias.sizes());
    check_same(op, "query_bias", bias, keys);
    p.bias = bias.to(acc).contiguous();
  } else {
    p.bias = at::zeros({queries.size(0), queries.size(1)}, p.queries.options());
  }
  p.scale = scale;
  p.normalize_values = normalize_values;
  p.keys_as_values = keys_as_values;
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_accumulate_forward(
    const at::Tensor& keys, const at::Tensor& queries, const at::Tensor& values, double scale,
    const std::optional<at::Tensor>& query_bias, bool normalize_values, bool keys_as_values,
    ClusterForwardKernel kernel) {
  const ClusterProblem p = make_problem("cluster_accumulate", keys, queries, values, scale,
                                        query_bias, normalize_values, keys_as_values);
  const auto options = p.queries.options();
  const int64_t b = p.batch();
  const int64_t m = p.centers();
  at::Tensor num = at::empty({b, m, p.value_dim()}, options);
  at::Tensor den = at::empty({b, m}, options);
  at::Tensor key_num = at::empty({b, m, keys_as_values ? p.key_dim() : 0}, options);
  if (b > 0) {
    kernel(p, num, den, key_num);
  }
  return {num, den, key_num};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cluster_accumulate_backward(
    const at::Tensor& grad_num, const at::Tensor& grad_den, const at::Tensor& grad_key_num,
    const at::Tensor& keys, const at::Tensor& queries, const at::Tensor& values, double scale,
    const std::optional<at::Tensor>& query_bias, bool normalize_values, bool keys_as_values,
    ClusterBackwardKernel kernel) {
  const char* op = "cluster_accumulate_backward";
  const ClusterProblem p =
      make_problem(op, keys, queries, values, scale, query_bias, normalize_values,
                   keys_as_values);
  const int64_t b = p.batch();
  const int64_t m = p.centers();
  const int64_t kd = keys_as_values ? p.key_dim() : 0;
  TORCH_CHECK(grad_num.sizes() == at::IntArrayRef({b, m, p.value_dim()}), op,
              ": grad_num must have shape (", b, ", ", m, ", ", p.value_dim(), "), got ",
              grad_num.sizes());
  TORCH_CHECK(grad_den.sizes() == at::IntArrayRef({b, m}), op, ": grad_den must have shape (",
              b, ", ", m, "), got ", grad_den.sizes());
  TORCH_CHECK(grad_key_num.sizes() == at::IntArrayRef({b, m, kd}), op,
              ": grad_key_num must have shape (", b, ", ", m, ", ", kd, "), got ",
              grad_key_num.sizes());
  const auto acc = p.queries.scalar_type();
  const at::Tensor g_num = grad_num.to(acc).contiguous();
  const at::Tensor g_den = grad_den.to(acc).contiguous();
  const at::Tensor g_key_num = grad_key_num.to(acc).contiguous();
  at::Tensor grad_keys = at::empty(p.keys.sizes(), p.keys.options());
  at::Tensor grad_values = at::empty(p.values.sizes(), p.values.options());
  at::Tensor grad_queries = at::zeros(p.queries.sizes(), p.queries.options());
  at::Tensor grad_bias = at::zeros(p.bias.sizes(), p.bias.options());
  if (b > 0) {
    kernel(p, g_num, g_den, g_key_num, grad_keys, grad_queries, grad_values, grad_bias);
  }
  return {grad_keys, grad_queries.to(queries.scalar_type()), grad_values,
          query_bias.has_value() ? grad_bias.to(queries.scalar_type())
                                 : at::empty({0}, queries.options())};
}

TORCH_LIBRARY_FRAGMENT(fusedset, m) {
  m.def(
      "cluster_accumulate(Tensor keys, Tensor queries, Tensor values, float scale, "
      "Tensor? query_bias=None, bool normalize_values=False, bool keys_as_values=False) "
      "-> (Tensor num, Tensor den, Tensor key_num)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "cluster_accumulate_backward(Tensor grad_num, Tensor grad_den, Tensor grad_key_num, "
      "Tensor keys, Tensor queries, Tensor values, float scale, Tensor? query_bias=None, "
      "bool normalize_values=False, bool keys_as_values=False) "
      "-> (Tensor grad_keys, Tensor grad_queries, Tensor grad_values, Tensor grad_query_bias)",
      {at::Tag::pt2_compliant_tag});
}

}  // namespace fusedset
