#pragma once
// The optional per-template lengths of the ops over ragged batches, checked once for all of them.
#include <ATen/ATen.h>

#include <optional>

namespace fusedset {

// lengths (B,) as int64 on the CPU: an integer vector of B values in [min_length, n], or n for
// every template when absent. `why` follows the range in the error ("" for none).
inline at::Tensor checked_lengths(const char* op, const std::optional<at::Tensor>& lengths,
                                  int64_t batch, int64_t n, int64_t min_length,
                                  const char* why) {
  if (!lengths.has_value()) {
    return at::full({batch}, n, at::TensorOptions().dtype(at::kLong));
  }
  const at::Tensor& l = *lengths;
  TORCH_CHECK(l.dim() == 1 && l.size(0) == batch, op, ": lengths must have shape (", batch,
              ",), got ", l.sizes());
  TORCH_CHECK(!at::isFloatingType(l.scalar_type()) && l.scalar_type() != at::kBool, op,
              ": lengths must be an integer tensor, got ", l.scalar_type());
  at::Tensor resolved = l.to(at::kCPU, at::kLong).contiguous();
  if (batch > 0) {
    const int64_t lo = resolved.min().item<int64_t>();
    const int64_t hi = resolved.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= min_length && hi <= n, op, ": lengths must lie in [", min_length,
                      ", N = ", n, "]", why, ", got values in [", lo, ", ", hi, "]");
  }
  return resolved;
}

}  // namespace fusedset
