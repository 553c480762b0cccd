// The elementwise parts of a Llama decoder layer, each fused into one pass over its rows:
// residual add + RMSNorm, rotary embedding (in place on q and k), SiLU(gate) * up. Eager
// torch runs each as 3-8 ops with as many temporaries and dispatcher calls; at the small
// row counts of a decode step that per-op cost is most of their time.
//
// Numerics are transformers' LlamaForCausalLM, including every place it rounds to the
// model dtype (T): the residual sum is rounded to T; RMSNorm computes in float32 from the
// rounded sum, rounds the normalised row to T, then multiplies by the weight (rounded);
// rotary rounds x*cos, rot(x)*sin and their sum; SiLU rounds silu(gate), then the product.
// At float32 those roundings are exact and the results differ from torch's only in the
// order of the RMSNorm's sum. Built with -ffp-contract=off so that no a*b + c is fused
// into an FMA that torch does not do.
//
// Each entry point first checks that it can take its arguments (CPU tensors of one dtype,
// float32, bfloat16 or float16; unit stride on the last dim; shapes that agree; rotary's
// cos/sin [T, D] contiguous with D even) and, if not, touches nothing and returns None or
// false: the Python wrapper (model/fused_ops.py) then runs its torch path. The checks are
// here, not in Python, because in Python they cost more than the kernels (~10 us a call).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "float_vec.h"

#include <cmath>

namespace {

using splitserve::kLanes;
using splitserve::load_float;
using splitserve::store_float;
using splitserve::Vec;
using splitserve::with_dtype;
constexpr int64_t kSerialElems = 1 << 15;  // below this many elements one thread runs the call

// v rounded to T and widened back: the value torch holds after an op whose output is T.
template <typename T>
inline Vec round_to(const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    alignas(64) T tmp[kLanes];
    store_float(tmp, v, kLanes);
    return load_float(tmp, kLanes);
  }
}

// body(r0, r1) over rows [0, rows), on one thread when the call is small.
template <typename F>
void for_rows(int64_t rows, int64_t elems_per_row, const F& body) {
  const int64_t grain = std::max<int64_t>(1, kSerialElems / std::max<int64_t>(1, elems_per_row));
  if (rows <= grain) {
    body(0, rows);
  } else {
    at::parallel_for(0, rows, grain, body);
  }
}

// out_row = weight * round(r * rsqrt(mean(r^2) + eps)), r already rounded to T.
template <typename T>
inline void norm_row(const T* r, const T* w, T* out, int64_t H, float eps) {
  Vec sq(0.f);
  for (int64_t j = 0; j < H; j += kLanes) {
    const int64_t n = std::min(kLanes, H - j);
    const Vec x = load_float(r + j, n);
    sq = sq + x * x;
  }
  const float inv = 1.f / std::sqrt(at::vec::vec_reduce_all<float>(std::plus<Vec>(), sq) / H + eps);
  const Vec vinv(inv);
  for (int64_t j = 0; j < H; j += kLanes) {
    const int64_t n = std::min(kLanes, H - j);
    const Vec normed = round_to<T>(load_float(r + j, n) * vinv);
    store_float(out + j, load_float(w + j, n) * normed, n);
  }
}

// t is a CPU tensor of dtype dt with unit stride on its last dim (dt one of the three).
bool takes(const at::Tensor& t, at::ScalarType dt, int64_t dim) {
  return t.dim() == dim && t.device().is_cpu() && t.scalar_type() == dt && t.stride(-1) == 1 &&
         (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf);
}

bool takes_norm(const at::Tensor& x, const at::Tensor& weight) {
  return takes(x, x.scalar_type(), 2) && takes(weight, x.scalar_type(), 1) && weight.size(0) == x.size(1);
}

}  // namespace

// A new [rows, H] tensor: RMSNorm of x's rows.
c10::optional<at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (!takes_norm(x, weight)) return c10::nullopt;
  const int64_t rows = x.size(0), H = x.size(1), xs = x.stride(0);
  at::Tensor out = at::empty({rows, H}, x.options());
  with_dtype(x.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    const T* xp = x.data_ptr<T>();
    const T* w = weight.data_ptr<T>();
    T* o = out.data_ptr<T>();
    for_rows(rows, H, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) norm_row(xp + r * xs, w, o + r * H, H, static_cast<float>(eps));
    });
  });
  return out;
}

// In place: residual <- round(residual + x); x <- RMSNorm(residual). Both [rows, H].
bool add_rms_norm_(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  if (!takes_norm(x, weight) || !takes(residual, x.scalar_type(), 2) || residual.sizes() != x.sizes()) {
    return false;
  }
  const int64_t rows = x.size(0), H = x.size(1), xs = x.stride(0), rs = residual.stride(0);
  with_dtype(x.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    T* xp = x.data_ptr<T>();
    T* res = residual.data_ptr<T>();
    const T* w = weight.data_ptr<T>();
    for_rows(rows, H, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        T* xr = xp + r * xs;
        T* rr = res + r * rs;
        for (int64_t j = 0; j < H; j += kLanes) {
          const int64_t n = std::min(kLanes, H - j);
          store_float(rr + j, load_float(rr + j, n) + load_float(xr + j, n), n);
        }
        norm_row(rr, w, xr, H, static_cast<float>(eps));
      }
    });
  });
  return true;
}

// In place on x [rows, heads, D] (any row and head strides): the rotate-half rotary
// embedding with cos/sin [rows, D].
template <typename T>
void rotate(T* x, int64_t rows, int64_t heads, int64_t D, int64_t s0, int64_t s1,
            const T* cos, const T* sin) {
  const int64_t half = D / 2;
  for_rows(rows, heads * D, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* c = cos + r * D;
      const T* s = sin + r * D;
      for (int64_t h = 0; h < heads; ++h) {
        T* row = x + r * s0 + h * s1;
        for (int64_t j = 0; j < half; j += kLanes) {
          const int64_t n = std::min(kLanes, half - j);
          const Vec x1 = load_float(row + j, n), x2 = load_float(row + half + j, n);
          const Vec lo = round_to<T>(x1 * load_float(c + j, n)) - round_to<T>(x2 * load_float(s + j, n));
          const Vec hi = round_to<T>(x2 * load_float(c + half + j, n)) + round_to<T>(x1 * load_float(s + half + j, n));
          store_float(row + j, lo, n);
          store_float(row + half + j, hi, n);
        }
      }
    }
  });
}

bool rotary_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  const at::ScalarType dt = q.scalar_type();
  if (!takes(q, dt, 3) || !takes(k, dt, 3) || !takes(cos, dt, 2) || !takes(sin, dt, 2) ||
      !cos.is_contiguous() || !sin.is_contiguous() || q.size(2) % 2 || k.size(2) != q.size(2) ||
      k.size(0) != q.size(0) || cos.sizes() != sin.sizes() || cos.size(0) != q.size(0) ||
      cos.size(1) != q.size(2)) {
    return false;
  }
  with_dtype(q.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    const int64_t D = q.size(2);
    for (at::Tensor* t : {&q, &k}) {
      rotate(t->data_ptr<T>(), t->size(0), t->size(1), D, t->stride(0), t->stride(1),
             cos.data_ptr<T>(), sin.data_ptr<T>());
    }
  });
  return true;
}

// A new [rows, I] tensor: round(round(silu(gate)) * up), gate_up = [rows, 2I] (gate first).
c10::optional<at::Tensor> silu_mul(const at::Tensor& gate_up) {
  if (!takes(gate_up, gate_up.scalar_type(), 2) || gate_up.size(1) % 2) return c10::nullopt;
  const int64_t rows = gate_up.size(0), I = gate_up.size(1) / 2, gs = gate_up.stride(0);
  at::Tensor out = at::empty({rows, I}, gate_up.options());
  with_dtype(gate_up.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    const T* g = gate_up.data_ptr<T>();
    T* o = out.data_ptr<T>();
    const Vec one(1.f);
    for_rows(rows, 2 * I, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* gr = g + r * gs;
        for (int64_t j = 0; j < I; j += kLanes) {
          const int64_t n = std::min(kLanes, I - j);
          const Vec x = load_float(gr + j, n);
          const Vec act = round_to<T>(x / (one + x.neg().exp()));
          store_float(o + r * I + j, act * load_float(gr + I + j, n), n);
        }
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row; None if the arguments are not for this kernel");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x; x = RMSNorm(residual), in place; false if not taken");
  m.def("rotary_", &rotary_, "rotate-half rotary embedding of q and k, in place; false if not taken");
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up of [rows, 2I] gate_up rows; None if not taken");
}
