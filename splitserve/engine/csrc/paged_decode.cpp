// Decode attention over the paged KV cache, read in place (no gather, no padding).
//
// One work item = one sequence x one kv head: the G = Hq / Hkv query heads that share that
// kv head are processed together, so every K and V row of the sequence is read from the
// pool exactly once. Tokens are visited one cache block at a time with an online softmax
// (running max m, running sum l, accumulator acc) kept in float32 whatever the storage
// dtype; bfloat16 rows are widened to float32 on load.
//
// Invariants the Python wrapper guarantees before calling (cheap metadata checks there):
// CPU tensors, q [B, Hq, D] and out [B, Hq, D] with unit last stride, k/v cache
// [num_blocks, block_size, Hkv, D] with unit last stride (any other strides: the views
// kv[:, layer, 0/1] of the engine's pool), block_tables [B, max_blocks] int64 contiguous,
// seq_lens [B] int64 contiguous, Hq % Hkv == 0. The values (lengths, block ids) are
// checked here, before any read, and raise ValueError.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// count (<= kLanes) values at p, widened to float; lanes beyond count are zero.
template <typename T>
inline Vec load_float(const T* p, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    return count == kLanes ? Vec::loadu(p) : Vec::loadu(p, count);
  } else {
    if (count == kLanes) {
      Vec out;
      at::vec::load_to_float(p, out);
      return out;
    }
    alignas(64) float tmp[kLanes] = {};
    for (int64_t i = 0; i < count; ++i) tmp[i] = static_cast<float>(p[i]);
    return Vec::loadu(tmp);
  }
}

template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  Vec sum(0.f);
  for (int64_t i = 0; i < d; i += kLanes) {
    const int64_t n = std::min(kLanes, d - i);
    sum = at::vec::fmadd(Vec::loadu(q + i), load_float(k + i, n), sum);  // q is zero-padded to whole vectors
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum);
}

template <typename q_t, typename kv_t>
void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                   at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t block_size = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t G = Hq / Hkv;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t Dp = (D + kLanes - 1) / kLanes * kLanes;  // scratch rows padded to whole vectors

  const q_t* q_ptr = q.data_ptr<q_t>();
  const kv_t* k_ptr = k_cache.data_ptr<kv_t>();
  const kv_t* v_ptr = v_cache.data_ptr<kv_t>();
  q_t* o_ptr = out.data_ptr<q_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const int64_t os0 = out.stride(0), os1 = out.stride(1);
  const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), ks2 = k_cache.stride(2);
  const int64_t vs0 = v_cache.stride(0), vs1 = v_cache.stride(1), vs2 = v_cache.stride(2);
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch: scaled queries, accumulators, one block's scores per head.
    std::vector<float> qf(G * Dp), acc(G * Dp), scores(G * block_size), m(G), l(G);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, kh = item % Hkv;
      const int64_t len = lens[b];
      for (int64_t g = 0; g < G; ++g) {
        const q_t* src = q_ptr + b * qs0 + (kh * G + g) * qs1;
        for (int64_t d = 0; d < Dp; ++d) qf[g * Dp + d] = d < D ? static_cast<float>(src[d]) * fscale : 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);

      const int64_t num_blocks_used = (len + block_size - 1) / block_size;
      for (int64_t j = 0; j < num_blocks_used; ++j) {
        const int64_t blk = tables[b * max_blocks + j];
        const int64_t n = std::min(block_size, len - j * block_size);
        const kv_t* kb = k_ptr + blk * ks0 + kh * ks2;
        const kv_t* vb = v_ptr + blk * vs0 + kh * vs2;
        for (int64_t t = 0; t < n; ++t) {
          const kv_t* krow = kb + t * ks1;
          for (int64_t g = 0; g < G; ++g) scores[g * block_size + t] = dot(&qf[g * Dp], krow, D);
        }
        for (int64_t g = 0; g < G; ++g) {
          float* s = &scores[g * block_size];
          float block_max = *std::max_element(s, s + n);
          const float m_new = std::max(m[g], block_max);
          // m_new is finite (scores are finite), so alpha is 0 on the first block.
          const float alpha = std::exp(m[g] - m_new);
          Vec sum(0.f);
          const Vec vmax(m_new);
          for (int64_t t = 0; t < n; t += kLanes) {
            const int64_t c = std::min(kLanes, n - t);
            Vec p = (Vec::loadu(s + t, c) - vmax).exp();
            if (c < kLanes) p = Vec::set(Vec(0.f), p, c);  // lanes past n must not add to the sum
            p.store(s + t, c);
            sum = sum + p;
          }
          l[g] = l[g] * alpha +
                 at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return a + c; }, sum);
          m[g] = m_new;
          if (alpha != 1.f) {
            const Vec va(alpha);
            for (int64_t d = 0; d < Dp; d += kLanes) (Vec::loadu(&acc[g * Dp + d]) * va).store(&acc[g * Dp + d]);
          }
        }
        for (int64_t t = 0; t < n; ++t) {
          const kv_t* vrow = vb + t * vs1;
          for (int64_t d = 0; d < Dp; d += kLanes) {
            const Vec vv = load_float(vrow + d, std::min(kLanes, D - d));
            for (int64_t g = 0; g < G; ++g) {
              float* a = &acc[g * Dp + d];
              at::vec::fmadd(Vec(scores[g * block_size + t]), vv, Vec::loadu(a)).store(a);
            }
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        q_t* dst = o_ptr + b * os0 + (kh * G + g) * os1;
        const float inv = 1.f / l[g];
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<q_t>(acc[g * Dp + d] * inv);
      }
    }
  });
}

void check_values(const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t num_blocks,
                  int64_t block_size) {
  const int64_t B = block_tables.size(0), max_blocks = block_tables.size(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lens[b];
    TORCH_CHECK_VALUE(len >= 1 && len <= max_blocks * block_size, "seq_lens[", b, "] = ", len,
                      " is outside [1, max_blocks * block_size = ", max_blocks * block_size, "]");
    const int64_t used = (len + block_size - 1) / block_size;
    for (int64_t j = 0; j < used; ++j) {
      const int64_t blk = tables[b * max_blocks + j];
      TORCH_CHECK_VALUE(blk >= 0 && blk < num_blocks, "block_tables[", b, ", ", j, "] = ", blk,
                        " is not a block id in [0, ", num_blocks, ")");
    }
  }
}

}  // namespace

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  check_values(block_tables, seq_lens, k_cache.size(0), k_cache.size(1));
  at::Tensor out = at::empty(q.sizes(), q.options());
  const bool q_bf16 = q.scalar_type() == at::kBFloat16;
  const bool kv_bf16 = k_cache.scalar_type() == at::kBFloat16;
  if (q_bf16 && kv_bf16) {
    decode_kernel<c10::BFloat16, c10::BFloat16>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
  } else if (q_bf16) {
    decode_kernel<c10::BFloat16, float>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
  } else if (kv_bf16) {
    decode_kernel<float, c10::BFloat16>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
  } else {
    decode_kernel<float, float>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache, read in place");
}
