#pragma once
// cluster_accumulate: CAFace's Cluster Network assignment, one streaming pass over the images.
// The shared host half (checks, layout, allocation) lives in cluster_accumulate.cpp; a backend
// supplies only the two kernels below.
#include <ATen/core/Tensor.h>

namespace fusedset {

// What the kernels read. keys, values: contiguous, the input dtype. queries, bias: contiguous,
// in the accumulation dtype (they are tiny and every image reads all of them).
struct ClusterProblem {
  at::Tensor keys;     // (B, N, D)
  at::Tensor queries;  // (Bq, M, D), Bq = 1 when shared across the batch, else B
  at::Tensor bias;     // (Bq, M): zeros when the op got no query_bias
  at::Tensor values;   // (B, N, C)
  double scale;
  bool normalize_values;  // values enter as v / (||v|| + 1e-5)
  bool keys_as_values;    // also accumulate A @ keys

  int64_t batch() const { return keys.size(0); }
  int64_t images() const { return keys.size(1); }
  int64_t key_dim() const { return keys.size(2); }
  int64_t centers() const { return queries.size(1); }
  int64_t value_dim() const { return values.size(2); }
  bool shared_queries() const { return queries.size(0) == 1; }
};

// Outputs in the accumulation dtype: num (B, M, C), den (B, M), key_num (B, M, D or 0).
using ClusterForwardKernel = void (*)(const ClusterProblem& p, at::Tensor& num, at::Tensor& den,
                                      at::Tensor& key_num);

// Gradients in, accumulation dtype, contiguous: grad_num (B, M, C), grad_den (B, M),
// grad_key_num (B, M, D or 0). Outputs: grad_keys and grad_values in the input dtype;
// grad_queries (Bq, M, D) and grad_bias (Bq, M) in the accumulation dtype.
using ClusterBackwardKernel = void (*)(const ClusterProblem& p, const at::Tensor& grad_num,
                                       const at::Tensor& grad_den,
                                       const at::Tensor& grad_key_num, at::Tensor& grad_keys,
                                       at::Tensor& grad_queries, at::Tensor& grad_values,
                                       at::Tensor& grad_bias);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_accumulate_forward(
    const at::Tensor& keys, const at::Tensor& queries, const at::Tensor& values, double scale,
    const std::optional<at::Tensor>& query_bias, bool normalize_values, bool keys_as_values,
    ClusterForwardKernel kernel);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cluster_accumulate_backward(
    const at::Tensor& grad_num, const at::Tensor& grad_den, const at::Tensor& grad_key_num,
    const at::Tensor& keys, const at::Tensor& queries, const at::Tensor& values, double scale,
    const std::optional<at::Tensor>& query_bias, bool normalize_values, bool keys_as_values,
    ClusterBackwardKernel kernel);

}  // namespace fusedset
