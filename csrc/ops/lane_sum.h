#pragma once
// Sums of n terms in independent partial sums: breaking the add dependency chain lets the
// compiler vectorize the loop. One sum per sweep: fusing two sums into one sweep spills the
// lanes and runs 3x slower (measured on style_pool).
#include <cstdint>

namespace fusedset {

constexpr int64_t kLanes = 16;

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

}  // namespace fusedset
