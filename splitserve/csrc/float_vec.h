// Helpers shared by splitserve's C++ kernels (splitserve/*/csrc): float vectors loaded from
// and stored to the three storage dtypes, and dispatch on the dtype. Every kernel computes
// in float32 whatever it stores; bfloat16/float16 values are widened on load and rounded
// (to nearest even, as torch rounds) on store.
#pragma once

#include <torch/extension.h>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace splitserve {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// n (<= kLanes) values at p widened to float; lanes past n are zero.
template <typename T>
inline Vec load_float(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return n == kLanes ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    if (n == kLanes) {
      Vec out;
      at::vec::load_to_float(p, out);
      return out;
    }
    alignas(64) float tmp[kLanes] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
    return Vec::loadu(tmp);
  }
}

// The first n lanes of v rounded to T and stored at p.
template <typename T>
inline void store_float(T* p, const Vec& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
    alignas(64) float tmp[kLanes];
    v.store(tmp);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(tmp[i]);
  }
}

// f(T{}) with T the C++ type of dtype: float32, bfloat16 or float16.
template <typename F>
void with_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK_VALUE(false, "unsupported dtype ", dtype);
  }
}

}  // namespace splitserve
