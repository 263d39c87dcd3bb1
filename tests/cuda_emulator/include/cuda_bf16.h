// CPU emulation of cuda_bf16.h for csrc/ (see cuda_runtime.h here): the bfloat16 storage type and
// its conversions. float -> bf16 rounds to nearest even (as __float2bfloat16); NaN stays NaN.
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  std::uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 x) {
  const std::uint32_t bits = static_cast<std::uint32_t>(x.bits) << 16;  // bf16 is the high half of an fp32
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {  // NaN: keep the sign, make it quiet
    return __nv_bfloat16{static_cast<std::uint16_t>((bits >> 16) | 0x40u)};
  }
  // Add half an ulp of bf16 minus one, plus the kept lowest bit (ties to even); a carry moves the
  // exponent up, and rounds to inf past the largest finite bf16.
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return __nv_bfloat16{static_cast<std::uint16_t>(bits >> 16)};
}
