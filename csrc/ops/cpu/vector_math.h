#pragma once
// Elementary functions written so that a loop over them vectorizes (libm's expf, sinf and cosf
// are calls the compiler cannot vectorize), and the target_clones attribute that compiles such
// loops for AVX2+FMA and AVX-512 besides the baseline x86-64 (SSE2) build.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fusedset {

#if defined(__x86_64__) && defined(__GNUC__)
#define FUSEDSET_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FUSEDSET_VECTOR_CLONES
#endif

// The unsigned integer as wide as a float or a double, to select between values by their bits.
template <typename T>
using BitsOf = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

// a where mask is all ones, b where it is zero. A ?: between two values computed in a loop may not
// vectorize: GCC sinks the arithmetic that only one side uses into a branch, where it may trap
// (the default -ftrapping-math) and so cannot be made unconditional again. Bitwise operations are
// never moved into a branch.
template <typename T>
inline T select_bits(BitsOf<T> mask, T a, T b) {
  BitsOf<T> a_bits;
  BitsOf<T> b_bits;
  std::memcpy(&a_bits, &a, sizeof(T));
  std::memcpy(&b_bits, &b, sizeof(T));
  const BitsOf<T> bits = (a_bits & mask) | (b_bits & ~mask);
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// e^x for x <= 0: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-7 polynomial
// (relative error about 2e-7), 2^n put into the exponent bits. Below -87, e^x underflows float
// anyway and is returned as 0. No std::floor (under GCC's default -ftrapping-math it stays a
// call) and no operation under a condition (kept as control flow): either stops the loop
// vectorizing.
inline float exp_nonpositive(float x) {
  // Adding and subtracting 1.5 * 2^23 rounds a float below 2^22 to the nearest integer.
  constexpr float kRound = 12582912.0f;
  const bool tiny = x < -87.0f;
  x = tiny ? -87.0f : x;
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float value = p * scale;
  return tiny ? 0.0f : value;
}

inline double exp_nonpositive(double x) {
  return std::exp(x);
}

// Largest |angle| sincos_reduced takes: its quotient by pi/2 stays an exact float integer.
constexpr float kSincosMaxAngle = 1 << 20;

// sin and cos of a float angle with |a| <= kSincosMaxAngle (callers route larger or non-finite
// angles to std::sin/std::cos). a = q pi/2 + r with |r| <= pi/4: r by three fused
// multiply-adds with pi/2 split in three floats (each rounds once, at the magnitude of r, so r
// is within about an ulp of the exact remainder of a), then Cephes' sinf/cosf polynomials on r
// (about 1 ulp) and the quadrant q mod 4 picks and signs them. All float: a double reduction
// (two conversions each way) made the whole 1.4x slower (measured).
inline void sincos_reduced(float a, float& sin_a, float& cos_a) {
  constexpr float kTwoOverPi = 0.63661975f;
  constexpr float kHalfPi1 = 1.5707963705062866f;
  constexpr float kHalfPi2 = -4.371138828673793e-08f;
  constexpr float kHalfPi3 = -1.7151245100058819e-15f;
  // Adding and subtracting 1.5 * 2^23 rounds a float below 2^22 to the nearest integer.
  constexpr float kRound = 12582912.0f;
  const float q = (a * kTwoOverPi + kRound) - kRound;
  float r = std::fma(-q, kHalfPi1, a);
  r = std::fma(-q, kHalfPi2, r);
  r = std::fma(-q, kHalfPi3, r);
  const int32_t quadrant = static_cast<int32_t>(q) & 3;
  const float z = r * r;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                   4.166664568298827e-2f) * z * z - 0.5f * z + 1.0f;
  const float sin_abs = (quadrant & 1) ? c : s;
  const float cos_abs = (quadrant & 1) ? s : c;
  sin_a = (quadrant & 2) ? -sin_abs : sin_abs;
  cos_a = ((quadrant + 1) & 2) ? -cos_abs : cos_abs;
}

}  // namespace fusedset
