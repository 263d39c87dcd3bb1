// CPU emulation of cuda_fp16.h for csrc/ (see cuda_runtime.h here): the IEEE half storage type and
// its conversions, in integer arithmetic (no compiler half type needed). float -> half rounds to
// nearest even (as __float2half): overflow gives ±inf, tiny values subnormals or ±0, NaN stays NaN.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>

struct __half {
  std::uint16_t bits;
};

inline float __half2float(__half h) {
  const std::uint32_t sign = (static_cast<std::uint32_t>(h.bits) & 0x8000u) << 16;
  const std::uint32_t exponent = (h.bits >> 10) & 0x1Fu, mantissa = h.bits & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa · 2^-24
    const float magnitude = ldexpf(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  // inf / NaN keep an all-ones exponent; normal numbers rebias 15 -> 127.
  const std::uint32_t biased = exponent == 0x1Fu ? 0xFFu : exponent + 112u;
  const std::uint32_t bits = sign | (biased << 23) | (mantissa << 13);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline __half __float2half(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const std::uint32_t sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return __half{static_cast<std::uint16_t>(sign | 0x7E00u)};   // NaN
  if (magnitude >= 0x477FF000u) return __half{static_cast<std::uint16_t>(sign | 0x7C00u)};  // >= 65520: inf
  if (magnitude < 0x38800000u) {
    // Below 2^-14: a subnormal half counts units of 2^-24; scaling by 2^24 is exact and nearbyintf
    // rounds half to even (a result of 1024 is the smallest normal half, bit pattern 0x400).
    const float units = fabsf(f) * 16777216.f;
    return __half{static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(nearbyintf(units)))};
  }
  // Normal: rebias the exponent 127 -> 15, keep 10 of the 23 mantissa bits, round the 13 dropped
  // bits to nearest even (a carry into the exponent is the correct next binade).
  std::uint32_t half = (((magnitude >> 23) - 112u) << 10) | ((magnitude >> 13) & 0x3FFu);
  const std::uint32_t dropped = magnitude & 0x1FFFu;
  if (dropped > 0x1000u || (dropped == 0x1000u && (half & 1u))) ++half;
  return __half{static_cast<std::uint16_t>(sign | half)};
}
