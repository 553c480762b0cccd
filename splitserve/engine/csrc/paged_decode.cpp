// Decode attention over the paged KV cache, read in place (no gather, no padding).
//
// The work is a list of pieces: a sequence and a range of its cache blocks. A piece walks
// its blocks in order and, within a block, every kv head in turn, so the block's K and V
// regions of the pool are read front to back (the access pattern the hardware prefetcher
// follows) and each row is read once: the G = Hq / Hkv query heads that share a kv head are
// computed together. Softmax is online (running max m, running sum l, accumulator acc),
// in float32 whatever the storage dtype; bfloat16/float16 rows are widened on load.
//
// Threads get equal shares of the batch's blocks, so a long sequence is split among
// threads (flash-decoding): a piece that is not a whole sequence leaves its (m, l, acc) in a
// slot, and the slots of one sequence are merged after the parallel region.
//
// Invariants the Python wrapper guarantees before calling (cheap metadata checks there):
// CPU tensors, q [B, Hq, D] with unit last stride, k/v cache [num_blocks, block_size, Hkv,
// D] with unit last stride (any other strides: the views kv[:, layer, 0/1] of the engine's
// pool), block_tables [B, max_blocks] int64 contiguous, seq_lens [B] int64 contiguous,
// Hq % Hkv == 0. The values (lengths, block ids) are checked here, before any read, and
// raise ValueError.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "float_vec.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using splitserve::kLanes;
using splitserve::load_float;
using splitserve::Vec;
using splitserve::with_dtype;
constexpr int64_t kSerialRows = 4096;  // K/V rows (tokens x kv heads) below which one thread runs the call

// One call's pointers, shapes and strides (strides in elements).
template <typename q_t, typename kv_t>
struct Problem {
  const q_t* q;
  const kv_t* k;
  const kv_t* v;
  const int64_t* tables;
  const int64_t* lens;
  int64_t Hq, Hkv, G, D, Dp, block_size, max_blocks;
  int64_t qs0, qs1, ks0, ks1, ks2, vs0, vs1, vs2;
  float scale;
};

// Online-softmax state of one piece for all Hq heads: acc [Hq, Dp], m [Hq], l [Hq].
struct State {
  float* acc;
  float* m;
  float* l;
};

// Asks for one row (D values) of a later block, a cache line at a time.
template <typename kv_t>
inline void prefetch_row(const kv_t* row, int64_t row_bytes) {
  const char* r = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(r + off);
}

// Blocks [j0, j1) of sequence b into state s (which starts empty).
// NV: vectors per head row when D == NV * kLanes is known at compile time (the loops then
// unroll fully and need no tail); 0 for any other D (runtime count, last vector partial).
template <int64_t NV, typename q_t, typename kv_t>
void attend_piece(const Problem<q_t, kv_t>& p, int64_t b, int64_t j0, int64_t j1, State s,
                  float* __restrict qf, float* __restrict scores) {
  const int64_t Hq = p.Hq, G = p.G, D = p.D, bs = p.block_size;
  const int64_t Dp = NV > 0 ? NV * kLanes : p.Dp;
  const int64_t nv = Dp / kLanes;
  const int64_t len = p.lens[b];
  const int64_t ks1 = p.ks1, vs1 = p.vs1;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(kv_t));
  float* __restrict acc = s.acc;
  float* __restrict m = s.m;
  float* __restrict l = s.l;
  auto tail = [&](int64_t i) { return NV > 0 ? kLanes : std::min(kLanes, D - i * kLanes); };

  for (int64_t h = 0; h < Hq; ++h) {
    const q_t* src = p.q + b * p.qs0 + h * p.qs1;
    for (int64_t d = 0; d < Dp; ++d) qf[h * Dp + d] = d < D ? static_cast<float>(src[d]) * p.scale : 0.f;
  }
  std::fill(acc, acc + Hq * Dp, 0.f);
  std::fill(m, m + Hq, -std::numeric_limits<float>::infinity());
  std::fill(l, l + Hq, 0.f);

  for (int64_t j = j0; j < j1; ++j) {
    const int64_t blk = p.tables[b * p.max_blocks + j];
    const int64_t n = std::min(bs, len - j * bs);
    // Later blocks are elsewhere in the pool (their own pages), where the hardware
    // prefetcher has no history: the rows of the block two ahead (one ahead arrived too
    // late from DRAM) are asked for one per row computed here, spread so the requests
    // never outrun the core's outstanding-miss slots (all at once measured no gain).
    const int64_t next_n = j + 2 < j1 ? std::min(bs, len - (j + 2) * bs) : 0;
    const int64_t next_blk = next_n ? p.tables[b * p.max_blocks + j + 2] : 0;
    for (int64_t kh = 0; kh < p.Hkv; ++kh) {
      const kv_t* kb = p.k + blk * p.ks0 + kh * p.ks2;
      const kv_t* vb = p.v + blk * p.vs0 + kh * p.vs2;
      const kv_t* next_kb = p.k + next_blk * p.ks0 + kh * p.ks2;
      const kv_t* next_vb = p.v + next_blk * p.vs0 + kh * p.vs2;
      // scores[g, t] = q_g . K[t] for the G heads of kv head kh
      for (int64_t t = 0; t < n; ++t) {
        if (t < next_n) {
          prefetch_row(next_kb + t * ks1, row_bytes);
          prefetch_row(next_vb + t * vs1, row_bytes);
        }
        const kv_t* krow = kb + t * ks1;
        Vec kvec[NV > 0 ? NV : 1];  // with NV known, the row is widened once for all G heads
        if constexpr (NV > 0) {
          for (int64_t i = 0; i < NV; ++i) kvec[i] = load_float(krow + i * kLanes, kLanes);
        }
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf + (kh * G + g) * Dp;
          Vec sum(0.f);
          for (int64_t i = 0; i < nv; ++i) {
            const Vec kk = NV > 0 ? kvec[i] : load_float(krow + i * kLanes, tail(i));
            sum = at::vec::fmadd(Vec::loadu(qg + i * kLanes), kk, sum);
          }
          scores[g * bs + t] = sum.reduce_add();
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kh * G + g;
        float* sc = scores + g * bs;
        // (std::max_element here ran as a scalar chain through memory: a quarter of the time)
        Vec vmax_block(-std::numeric_limits<float>::infinity());
        for (int64_t t = 0; t < n; t += kLanes) {
          const int64_t c = std::min(kLanes, n - t);
          vmax_block = at::vec::maximum(vmax_block, Vec::set(vmax_block, Vec::loadu(sc + t, c), c));
        }
        const float m_new = std::max(m[h], vmax_block.reduce_max());
        // Scores are finite, so m_new is: alpha is exp(-inf) = 0 on the first block, and 1
        // (no call) on most later ones, once the running max has settled.
        const float alpha = m_new == m[h] ? 1.f : std::exp(m[h] - m_new);
        Vec sum(0.f);
        const Vec vmax(m_new);
        for (int64_t t = 0; t < n; t += kLanes) {
          const int64_t c = std::min(kLanes, n - t);
          Vec e = (Vec::loadu(sc + t, c) - vmax).exp();
          if (c < kLanes) e = Vec::set(Vec(0.f), e, c);  // lanes past n must not add to the sum
          e.store(sc + t, c);
          sum = sum + e;
        }
        l[h] = l[h] * alpha + sum.reduce_add();
        m[h] = m_new;
        // acc[h] = alpha * acc[h] + sum_t e[t] * V[t]
        float* a = acc + h * Dp;
        const Vec va(alpha);
        if constexpr (NV > 0) {
          // The row in registers, two tokens at a time into two sets: 2 * NV independent
          // FMA chains (one chain per vector would wait on the FMA latency every token).
          Vec r0[NV], r1[NV];
          for (int64_t i = 0; i < NV; ++i) r0[i] = Vec::loadu(a + i * kLanes) * va, r1[i] = Vec(0.f);
          int64_t t = 0;
          for (; t + 1 < n; t += 2) {
            const Vec e0(sc[t]), e1(sc[t + 1]);
            const kv_t* v0 = vb + t * vs1;
            const kv_t* v1 = v0 + vs1;
            for (int64_t i = 0; i < NV; ++i) {
              r0[i] = at::vec::fmadd(e0, load_float(v0 + i * kLanes, kLanes), r0[i]);
              r1[i] = at::vec::fmadd(e1, load_float(v1 + i * kLanes, kLanes), r1[i]);
            }
          }
          if (t < n) {
            const Vec e0(sc[t]);
            for (int64_t i = 0; i < NV; ++i)
              r0[i] = at::vec::fmadd(e0, load_float(vb + t * vs1 + i * kLanes, kLanes), r0[i]);
          }
          for (int64_t i = 0; i < NV; ++i) (r0[i] + r1[i]).store(a + i * kLanes);
        } else {
          for (int64_t i = 0; i < nv; ++i) {
            Vec r = Vec::loadu(a + i * kLanes) * va;
            for (int64_t t = 0; t < n; ++t)
              r = at::vec::fmadd(Vec(sc[t]), load_float(vb + t * vs1 + i * kLanes, tail(i)), r);
            r.store(a + i * kLanes);
          }
        }
      }
    }
  }
}

// out[b] ([Hq, D], contiguous) from the states of the pieces that covered sequence b (one,
// or several split among threads): rescaled to their common max, normalised by the sum.
template <typename q_t>
void write_out(q_t* out, int64_t Hq, int64_t D, int64_t Dp, const State* parts, int64_t n_parts) {
  std::vector<float> w(n_parts);
  for (int64_t h = 0; h < Hq; ++h) {
    float m_all = -std::numeric_limits<float>::infinity(), l_all = 0.f;
    for (int64_t i = 0; i < n_parts; ++i) m_all = std::max(m_all, parts[i].m[h]);
    for (int64_t i = 0; i < n_parts; ++i) l_all += (w[i] = std::exp(parts[i].m[h] - m_all)) * parts[i].l[h];
    for (int64_t i = 0; i < n_parts; ++i) w[i] /= l_all;
    for (int64_t d = 0; d < D; ++d) {
      float v = 0.f;
      for (int64_t i = 0; i < n_parts; ++i) v += parts[i].acc[h * Dp + d] * w[i];
      out[h * D + d] = static_cast<q_t>(v);
    }
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
  p.tables = block_tables.data_ptr<int64_t>();
  p.lens = seq_lens.data_ptr<int64_t>();
  p.Hq = q.size(1);
  p.Hkv = k_cache.size(2);
  p.G = p.Hq / p.Hkv;
  p.D = q.size(2);
  p.Dp = (p.D + kLanes - 1) / kLanes * kLanes;  // scratch rows padded to whole vectors
  p.block_size = k_cache.size(1);
  p.max_blocks = block_tables.size(1);
  p.qs0 = q.stride(0), p.qs1 = q.stride(1);
  p.ks0 = k_cache.stride(0), p.ks1 = k_cache.stride(1), p.ks2 = k_cache.stride(2);
  p.vs0 = v_cache.stride(0), p.vs1 = v_cache.stride(1), p.vs2 = v_cache.stride(2);
  p.scale = static_cast<float>(scale);
  const int64_t B = q.size(0), Hq = p.Hq, D = p.D, Dp = p.Dp;
  q_t* o = out.data_ptr<q_t>();

  // first[b]: sequence b's first block in the batch's list of blocks.
  std::vector<int64_t> first(B + 1, 0);
  int64_t rows = 0;
  for (int64_t b = 0; b < B; ++b) {
    first[b + 1] = first[b] + (p.lens[b] + p.block_size - 1) / p.block_size;
    rows += p.lens[b] * p.Hkv;
  }
  const int64_t total = first[B];
  // Below kSerialRows the call is a few tens of microseconds: less than waking the thread
  // pool, or waiting for a descheduled worker on a busy machine.
  // (lazy_init first, as parallel_for does: in a thread that has not yet run a parallel
  // op, the OpenMP count is not yet torch's setting)
  at::internal::lazy_init_num_threads();
  const int64_t threads = rows < kSerialRows ? 1 : std::min<int64_t>(at::get_num_threads(), total);

  // Two slots per thread: only its first piece can start inside a sequence and only its
  // last can end inside one. slot_b[i]: the sequence slot i holds, -1 when unused.
  const int64_t n_slots = 2 * threads;
  std::vector<float> slot_acc(n_slots * Hq * Dp), slot_m(n_slots * Hq), slot_l(n_slots * Hq);
  std::vector<int64_t> slot_b(n_slots, -1);

  auto run_chunk = [&](int64_t c) {
    const int64_t g0 = c * total / threads, g1 = (c + 1) * total / threads;
    if (g0 == g1) return;
    std::vector<float> qf(Hq * Dp), scores(p.G * p.block_size), acc(Hq * Dp), m(Hq), l(Hq);
    int64_t b = std::upper_bound(first.begin(), first.end(), g0) - first.begin() - 1;
    int64_t used_slots = 0;
    for (int64_t g = g0; g < g1; ++b) {
      const int64_t j0 = g - first[b], j1 = std::min(g1, first[b + 1]) - first[b];
      const bool whole = j0 == 0 && first[b] + j1 == first[b + 1];
      State s{acc.data(), m.data(), l.data()};
      if (!whole) {
        TORCH_INTERNAL_ASSERT(used_slots < 2);
        const int64_t i = 2 * c + used_slots++;
        slot_b[i] = b;
        s = State{&slot_acc[i * Hq * Dp], &slot_m[i * Hq], &slot_l[i * Hq]};
      }
      if (D == 4 * kLanes) {
        attend_piece<4>(p, b, j0, j1, s, qf.data(), scores.data());
      } else if (D == 8 * kLanes) {
        attend_piece<8>(p, b, j0, j1, s, qf.data(), scores.data());
      } else {
        attend_piece<0>(p, b, j0, j1, s, qf.data(), scores.data());
      }
      if (whole) write_out(o + b * Hq * D, Hq, D, Dp, &s, 1);
      g = first[b] + j1;
    }
  };
  if (threads == 1) {
    run_chunk(0);
  } else {
    at::parallel_for(0, threads, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) run_chunk(c);
    });
  }
  // Sequences split among threads: their slots are consecutive, in block order.
  std::vector<State> parts;
  for (int64_t i = 0; i < n_slots;) {
    if (slot_b[i] < 0) {
      ++i;
      continue;
    }
    parts.clear();
    const int64_t b = slot_b[i];
    for (; i < n_slots && (slot_b[i] == b || slot_b[i] < 0); ++i) {
      if (slot_b[i] == b) parts.push_back(State{&slot_acc[i * Hq * Dp], &slot_m[i * Hq], &slot_l[i * Hq]});
    }
    write_out(o + b * Hq * D, Hq, D, Dp, parts.data(), static_cast<int64_t>(parts.size()));
  }
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
  with_dtype(q.scalar_type(), [&](auto q_zero) {
    with_dtype(k_cache.scalar_type(), [&](auto kv_zero) {
      decode_kernel<decltype(q_zero), decltype(kv_zero)>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache, read in place");
}
