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
constexpr int64_t kSerialTokens = 4096;  // (sequence, kv head) rows below which one thread runs the call

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

// The shape of one call, copied into each work item's locals so that stores to the
// scratch buffers cannot be assumed to alias them (keeps them in registers).
template <typename q_t, typename kv_t>
struct Problem {
  const q_t* q;
  const kv_t* k;
  const kv_t* v;
  q_t* out;
  const int64_t* tables;
  const int64_t* lens;
  int64_t Hkv, G, D, Dp, block_size, max_blocks;
  int64_t qs0, qs1, os0, os1, ks0, ks1, ks2, vs0, vs1, vs2;
  float scale;
};

// Asks for the n K and V rows of (block, kv head) while the current block is computed:
// rows of one head are block_size * Hkv * D apart in the pool, too sparse for the hardware
// prefetcher to run ahead of a 16-row block.
template <typename q_t, typename kv_t>
inline void prefetch_block(const Problem<q_t, kv_t>& p, int64_t blk, int64_t kh, int64_t n) {
  const char* kb = reinterpret_cast<const char*>(p.k + blk * p.ks0 + kh * p.ks2);
  const char* vb = reinterpret_cast<const char*>(p.v + blk * p.vs0 + kh * p.vs2);
  const int64_t row_bytes = p.D * static_cast<int64_t>(sizeof(kv_t));
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t off = 0; off < row_bytes; off += 64) {
      __builtin_prefetch(kb + t * p.ks1 * sizeof(kv_t) + off);
      __builtin_prefetch(vb + t * p.vs1 * sizeof(kv_t) + off);
    }
  }
}

// NV: vectors per head row when D == NV * kLanes is known at compile time (the loops then
// unroll fully and need no tail); 0 for any other D (runtime count, last vector partial).
template <int64_t NV, typename q_t, typename kv_t>
void attend(const Problem<q_t, kv_t>& p, int64_t b, int64_t kh, float* __restrict qf,
            float* __restrict acc, float* __restrict scores, float* __restrict m,
            float* __restrict l) {
  const int64_t G = p.G, D = p.D, bs = p.block_size;
  const int64_t Dp = NV > 0 ? NV * kLanes : p.Dp;
  const int64_t nv = Dp / kLanes;
  const int64_t len = p.lens[b];
  const int64_t ks1 = p.ks1, vs1 = p.vs1;
  auto tail = [&](int64_t i) { return NV > 0 ? kLanes : std::min(kLanes, D - i * kLanes); };

  for (int64_t g = 0; g < G; ++g) {
    const q_t* src = p.q + b * p.qs0 + (kh * G + g) * p.qs1;
    for (int64_t d = 0; d < Dp; ++d) qf[g * Dp + d] = d < D ? static_cast<float>(src[d]) * p.scale : 0.f;
  }
  std::fill(acc, acc + G * Dp, 0.f);
  // m, l: running max and sum of exp per query head.
  std::fill(m, m + G, -std::numeric_limits<float>::infinity());
  std::fill(l, l + G, 0.f);

  const int64_t used = (len + bs - 1) / bs;
  for (int64_t j = 0; j < used; ++j) {
    const int64_t blk = p.tables[b * p.max_blocks + j];
    const int64_t n = std::min(bs, len - j * bs);
    const kv_t* kb = p.k + blk * p.ks0 + kh * p.ks2;
    const kv_t* vb = p.v + blk * p.vs0 + kh * p.vs2;
    if (j + 1 < used) prefetch_block(p, p.tables[b * p.max_blocks + j + 1], kh, std::min(bs, len - (j + 1) * bs));
    for (int64_t t = 0; t < n; ++t) {
      const kv_t* krow = kb + t * ks1;
      Vec kvec[NV > 0 ? NV : 1];  // with NV known, the row is widened once for all G heads
      if constexpr (NV > 0) {
        for (int64_t i = 0; i < NV; ++i) kvec[i] = load_float(krow + i * kLanes, kLanes);
      }
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qf + g * Dp;
        Vec sum(0.f);
        for (int64_t i = 0; i < nv; ++i) {
          const Vec kk = NV > 0 ? kvec[i] : load_float(krow + i * kLanes, tail(i));
          sum = at::vec::fmadd(Vec::loadu(qg + i * kLanes), kk, sum);
        }
        scores[g * bs + t] = sum.reduce_add();
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float* s = scores + g * bs;
      const float m_new = std::max(m[g], *std::max_element(s, s + n));
      // Scores are finite, so m_new is: alpha is exp(-inf) = 0 on the first block.
      const float alpha = std::exp(m[g] - m_new);
      Vec sum(0.f);
      const Vec vmax(m_new);
      for (int64_t t = 0; t < n; t += kLanes) {
        const int64_t c = std::min(kLanes, n - t);
        Vec e = (Vec::loadu(s + t, c) - vmax).exp();
        if (c < kLanes) e = Vec::set(Vec(0.f), e, c);  // lanes past n must not add to the sum
        e.store(s + t, c);
        sum = sum + e;
      }
      l[g] = l[g] * alpha + sum.reduce_add();
      m[g] = m_new;
      // acc[g] = alpha * acc[g] + sum_t e[t] * V[t]
      float* a = acc + g * Dp;
      const Vec va(alpha);
      if constexpr (NV > 0) {
        // The row in registers, two tokens at a time into two sets: 2 * NV independent
        // FMA chains (one chain per vector would wait on the FMA latency every token).
        Vec r0[NV], r1[NV];
        for (int64_t i = 0; i < NV; ++i) r0[i] = Vec::loadu(a + i * kLanes) * va, r1[i] = Vec(0.f);
        int64_t t = 0;
        for (; t + 1 < n; t += 2) {
          const Vec e0(s[t]), e1(s[t + 1]);
          const kv_t* v0 = vb + t * vs1;
          const kv_t* v1 = v0 + vs1;
          for (int64_t i = 0; i < NV; ++i) {
            r0[i] = at::vec::fmadd(e0, load_float(v0 + i * kLanes, kLanes), r0[i]);
            r1[i] = at::vec::fmadd(e1, load_float(v1 + i * kLanes, kLanes), r1[i]);
          }
        }
        if (t < n) {
          const Vec e0(s[t]);
          for (int64_t i = 0; i < NV; ++i)
            r0[i] = at::vec::fmadd(e0, load_float(vb + t * vs1 + i * kLanes, kLanes), r0[i]);
        }
        for (int64_t i = 0; i < NV; ++i) (r0[i] + r1[i]).store(a + i * kLanes);
      } else {
        for (int64_t i = 0; i < nv; ++i) {
          Vec r = Vec::loadu(a + i * kLanes) * va;
          for (int64_t t = 0; t < n; ++t)
            r = at::vec::fmadd(Vec(s[t]), load_float(vb + t * vs1 + i * kLanes, tail(i)), r);
          r.store(a + i * kLanes);
        }
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    q_t* dst = p.out + b * p.os0 + (kh * G + g) * p.os1;
    const float inv = 1.f / l[g];
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<q_t>(acc[g * Dp + d] * inv);
  }
}

template <typename q_t, typename kv_t>
void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                   at::Tensor& out) {
  Problem<q_t, kv_t> p;
  p.q = q.data_ptr<q_t>();
  p.k = k_cache.data_ptr<kv_t>();
  p.v = v_cache.data_ptr<kv_t>();
  p.out = out.data_ptr<q_t>();
  p.tables = block_tables.data_ptr<int64_t>();
  p.lens = seq_lens.data_ptr<int64_t>();
  p.Hkv = k_cache.size(2);
  p.G = q.size(1) / p.Hkv;
  p.D = q.size(2);
  p.Dp = (p.D + kLanes - 1) / kLanes * kLanes;  // scratch rows padded to whole vectors
  p.block_size = k_cache.size(1);
  p.max_blocks = block_tables.size(1);
  p.qs0 = q.stride(0), p.qs1 = q.stride(1), p.os0 = out.stride(0), p.os1 = out.stride(1);
  p.ks0 = k_cache.stride(0), p.ks1 = k_cache.stride(1), p.ks2 = k_cache.stride(2);
  p.vs0 = v_cache.stride(0), p.vs1 = v_cache.stride(1), p.vs2 = v_cache.stride(2);
  p.scale = static_cast<float>(scale);

  auto run_items = [&p](int64_t begin, int64_t end) {
    std::vector<float> qf(p.G * p.Dp), acc(p.G * p.Dp), scores(p.G * p.block_size), m(p.G), l(p.G);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / p.Hkv, kh = item % p.Hkv;
      if (p.D == 4 * kLanes) {
        attend<4>(p, b, kh, qf.data(), acc.data(), scores.data(), m.data(), l.data());
      } else if (p.D == 8 * kLanes) {
        attend<8>(p, b, kh, qf.data(), acc.data(), scores.data(), m.data(), l.data());
      } else {
        attend<0>(p, b, kh, qf.data(), acc.data(), scores.data(), m.data(), l.data());
      }
    }
  };

  // Items are split among threads by cost (tokens attended), not by count: decode lengths
  // are ragged. Below kSerialTokens the work is a few tens of microseconds, less than
  // waking the thread pool (or waiting for a descheduled worker on a busy machine).
  const int64_t B = q.size(0), n_items = B * p.Hkv;
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += p.lens[b] * p.Hkv;
  const int64_t threads = total < kSerialTokens ? 1 : std::min<int64_t>(at::get_num_threads(), n_items);
  if (threads <= 1) {
    run_items(0, n_items);
    return;
  }
  // bounds[c]: the first item of chunk c; chunk c holds about total / threads tokens.
  std::vector<int64_t> bounds(threads + 1, n_items);
  bounds[0] = 0;
  int64_t seen = 0, chunk = 1;
  for (int64_t item = 0; item < n_items && chunk < threads; ++item) {
    while (chunk < threads && seen >= chunk * total / threads) bounds[chunk++] = item;
    seen += p.lens[item / p.Hkv];
  }
  at::parallel_for(0, threads, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) run_items(bounds[c], bounds[c + 1]);
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
