// The dense fallback's epilogue on XLA:CPU in one pass (see lrcc_jax/_packed.py, `dense_epilogue`).
//
//   y[r, b * bs + j] = M[r, b] ? relu(z[r, b * bs + j] + bias[b * bs + j]) : 0
//
// z is the dense product (rows, n_out), scores the block scores (rows, n_blocks) of the
// estimate and M the contract's mask (docs/design.md, "The mask"): block b passes when
// !(scores[r, b] <= threshold) (NaN passes) and, with a capacity k < n_blocks, when it is
// also among the row's k highest scores, NaN ranked as +inf and ties going to the lower
// index (lax.top_k's choice). The k-th highest score is found by the bisection of
// `_mask.top_k_membership` on the same order-preserving integer keys (topk.h: vectorised
// counts over the keys' high halves, then the few low halves that remain); it runs only
// when more than k blocks pass the threshold. The bias, ReLU and mask are applied while z
// is read once. Rows are split over the XLA:CPU thread pool.
//
// lrcc_estimated_masked_relu does the same from the inputs instead of the scores: it also
// computes the estimate zhat = (x U) V + bias and its block scores (max over a block's
// units, NaN if any unit is NaN), eight rows at a time in register-blocked products, right
// before the rows' epilogue. At 64-128 rows of a 1024-wide layer (rank 64) XLA ran the two
// thin products at about half the rate of the dense one and wrote the scores out and read
// them back: this replaces five XLA ops and two passes over memory with one call.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "topk.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using lrcc_topk::Keys;
using lrcc_topk::KthKey;

// relu(v) with NaN kept, or 0 where not kept; a select, so the loops below vectorise.
inline float KeptRelu(bool kept, float v) { return (kept && (v > 0.0f || v != v)) ? v : 0.0f; }

struct Job {
  const float* z;
  const float* scores;
  const float* bias;
  float threshold;
  float* y;
  int64_t rows, n_blocks, bs, capacity, chunk, n_chunks;
  // The estimated variant: scores (writable) are computed from x (rows, n_in), U padded to
  // rp columns (n_in, rp; rp a multiple of 16, the padding zero) and V (r, n_out).
  const float* x = nullptr;
  const float* u = nullptr;
  const float* v = nullptr;
  float* est_scores = nullptr;
  int64_t n_in = 0, r = 0, rp = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// The loops below take restrict-qualified pointers: a uint8_t store may alias anything, and
// without the qualifiers GCC reloaded every pointer after each byte and ran them scalar.

// keep[b] = !(s[b] <= t) (NaN passes); returns how many pass.
inline int64_t Passing(const float* __restrict s, int64_t nb, float t, uint8_t* __restrict keep) {
  uint32_t passing = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t pass = !(s[b] <= t);
    keep[b] = pass;
    passing += pass;
  }
  return passing;
}

// keep[b] &= keys[b] >= kth.
inline void KeepAtLeast(const uint32_t* __restrict keys, int64_t nb, uint32_t kth,
                        uint8_t* __restrict keep) {
  for (int64_t b = 0; b < nb; ++b) keep[b] = keep[b] & (keys[b] >= kth ? 1 : 0);
}

// y = keep ? relu(z + bias) : 0 over n units of single-unit blocks.
inline void UnitEpilogue(const float* __restrict z, const float* __restrict bias,
                         const uint8_t* __restrict keep, int64_t n, float* __restrict y) {
  for (int64_t j = 0; j < n; ++j) y[j] = KeptRelu(keep[j], z[j] + bias[j]);
}

// The same for one block of bs units, kept or not.
inline void BlockEpilogue(const float* __restrict z, const float* __restrict bias, bool kept,
                          int64_t bs, float* __restrict y) {
  if (!kept) {
    std::memset(y, 0, bs * sizeof(float));
    return;
  }
  for (int64_t j = 0; j < bs; ++j) y[j] = KeptRelu(true, z[j] + bias[j]);
}

// 16 floats: one AVX-512 register (two AVX2 ones) through the GCC/Clang vector extension.
typedef float V16 __attribute__((vector_size(64)));
inline V16 Load16(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store16(float* p, V16 v) { std::memcpy(p, &v, sizeof v); }

// BlockEpilogue for bs a multiple of 16, 16 units to a vector.
inline void BlockEpilogue16(const float* z, const float* bias, bool kept, int64_t bs, float* y) {
  if (!kept) {
    std::memset(y, 0, bs * sizeof(float));
    return;
  }
  const V16 zero = {};
  for (int64_t u = 0; u < bs; u += 16) {
    const V16 e = Load16(z + u) + Load16(bias + u);
    Store16(y + u, (e > zero) | (e != e) ? e : zero);
  }
}

// Scratch of one thread for Row.
struct RowBuffers {
  std::vector<uint32_t> keys;
  std::vector<uint16_t> high, low;
  std::vector<uint8_t> keep;
  explicit RowBuffers(int64_t nb) : keys(nb), high(nb), low(nb), keep(nb) {}
};

void Row(const Job& jb, int64_t r, RowBuffers& buf) {
  const int64_t nb = jb.n_blocks, bs = jb.bs, n = nb * bs;
  const float* s = jb.scores + r * nb;
  const float* z = jb.z + r * n;
  float* y = jb.y + r * n;
  uint8_t* keep = buf.keep.data();
  const int64_t passing = Passing(s, nb, jb.threshold, keep);
  // The capacity binds only when more than k blocks pass; then the k highest scores all
  // pass (passing keys order above the others), so only the rank among all keys matters.
  const int64_t k = jb.capacity;
  if (k > 0 && k < passing) {
    uint32_t* kp = buf.keys.data();
    Keys(s, nb, kp, buf.high.data());
    const auto [kth, exact] = KthKey(kp, buf.high.data(), nb, k, buf.low.data());
    if (exact) {
      KeepAtLeast(kp, nb, kth, keep);
    } else {  // kth is the k-th highest key; equal keys go to the lower index
      int64_t greater = 0;
      for (int64_t b = 0; b < nb; ++b) greater += kp[b] > kth;
      int64_t ties_left = k - greater;
      for (int64_t b = 0; b < nb; ++b) {
        bool in_top = kp[b] > kth;
        if (kp[b] == kth && ties_left > 0) {
          in_top = true;
          --ties_left;
        }
        keep[b] = keep[b] && in_top;
      }
    }
  }
  const float* bias = jb.bias;
  if (bs == 1) {
    UnitEpilogue(z, bias, keep, n, y);
  } else {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t j = b * bs;
      if (bs % 16 == 0) {
        BlockEpilogue16(z + j, bias + j, keep[b], bs, y + j);
      } else {
        BlockEpilogue(z + j, bias + j, keep[b], bs, y + j);
      }
    }
  }
}


// out[s, j0 : j0 + 16 NC] = a[s, 0:k] B[0:k, j0 : j0 + 16 NC] for R rows of a (row strides
// a_stride, b_stride, out_stride): both products of the estimate, x U and t V. Each load of
// B feeds R rows, in R * NC independent accumulators (16 at R = 8, NC = 2: 32 columns, half
// the loads of B per multiply-add that four rows x 64 columns took).
template <int R, int NC>
void RowsTimesCols(const float* a, int64_t a_stride, int64_t k, const float* b, int64_t b_stride,
                   int64_t j0, float* out, int64_t out_stride) {
  V16 acc[R][NC] = {};
  for (int64_t q = 0; q < k; ++q) {
    V16 bv[NC];
    for (int c = 0; c < NC; ++c) bv[c] = Load16(b + q * b_stride + j0 + 16 * c);
    for (int s = 0; s < R; ++s) {
      const float av = a[s * a_stride + q];
      for (int c = 0; c < NC; ++c) acc[s][c] += av * bv[c];
    }
  }
  for (int s = 0; s < R; ++s)
    for (int c = 0; c < NC; ++c) Store16(out + s * out_stride + j0 + 16 * c, acc[s][c]);
}

// t[s] = x[s] U for rows [r0, r0 + R), in strips of at most 32 columns (rp, the padded
// rank, is a multiple of 16; t is R x rp).
template <int R>
void TimesU(const Job& jb, int64_t r0, float* t) {
  const float* x = jb.x + r0 * jb.n_in;
  for (int64_t c0 = 0; c0 < jb.rp; c0 += 32) {
    if (jb.rp - c0 >= 32) {
      RowsTimesCols<R, 2>(x, jb.n_in, jb.n_in, jb.u, jb.rp, c0, t, jb.rp);
    } else {
      RowsTimesCols<R, 1>(x, jb.n_in, jb.n_in, jb.u, jb.rp, c0, t, jb.rp);
    }
  }
}

// max_u (z[u] + bias[u]) over one block of bs units, bs a multiple of 16; NaN if any is.
// Lane-wise maxima, then a tree over the 16 lanes: the scalar loop below ran at one unit
// per cycle and took a third of the estimate's time at blocks of 16.
inline float BlockMax16(const float* z, const float* bias, int64_t bs) {
  typedef int32_t I16 __attribute__((vector_size(64)));
  V16 best = Load16(z) + Load16(bias);
  I16 nan = best != best;
  for (int64_t u = 16; u < bs; u += 16) {
    const V16 e = Load16(z + u) + Load16(bias + u);
    nan |= e != e;
    best = best < e ? e : best;
  }
  const I16 halves[4] = {{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7},
                         {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11},
                         {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13},
                         {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}};
  for (const I16& perm : halves) {
    const V16 other = __builtin_shuffle(best, perm);
    best = best < other ? other : best;
    nan |= __builtin_shuffle(nan, perm);
  }
  return nan[0] ? NAN : best[0];
}

// Block scores of rows [r0, r0 + R) from their t (R x rp):
// zhat = t V + bias (into z, R x n_out), then each block's max
// (NaN if any unit is NaN).
template <int R>
void Scores(const Job& jb, int64_t r0, const float* t, float* z) {
  const int64_t rp = jb.rp, r = jb.r, nb = jb.n_blocks, bs = jb.bs, n_out = nb * bs;
  int64_t j = 0;
  for (; j + 32 <= n_out; j += 32) RowsTimesCols<R, 2>(t, rp, r, jb.v, n_out, j, z, n_out);
  for (; j + 16 <= n_out; j += 16) RowsTimesCols<R, 1>(t, rp, r, jb.v, n_out, j, z, n_out);
  for (; j < n_out; ++j) {
    for (int s = 0; s < R; ++s) {
      float acc = 0.f;
      for (int64_t q = 0; q < r; ++q) acc += t[s * rp + q] * jb.v[q * n_out + j];
      z[s * n_out + j] = acc;
    }
  }
  for (int s = 0; s < R; ++s) {
    const float* zs = z + s * n_out;
    float* out = jb.est_scores + (r0 + s) * nb;
    if (bs == 1) {
      for (int64_t b = 0; b < nb; ++b) out[b] = zs[b] + jb.bias[b];
      continue;
    }
    if (bs % 16 == 0) {
      for (int64_t b = 0; b < nb; ++b) out[b] = BlockMax16(zs + b * bs, jb.bias + b * bs, bs);
      continue;
    }
    for (int64_t b = 0; b < nb; ++b) {
      float best = -INFINITY;
      bool nan = false;
      for (int64_t u = b * bs; u < (b + 1) * bs; ++u) {
        const float e = zs[u] + jb.bias[u];
        nan |= e != e;
        best = std::max(best, e);
      }
      out[b] = nan ? NAN : best;
    }
  }
}

// Calls fn(std::integral_constant<int, R>(), r0) for rows [begin, end) in groups of R = 8
// (the last group 1-7 rows).
template <typename Fn>
void RowGroups(int64_t begin, int64_t end, Fn&& fn) {
  int64_t r0 = begin;
  for (; r0 + 8 <= end; r0 += 8) fn(std::integral_constant<int, 8>(), r0);
  switch (end - r0) {
    case 1: fn(std::integral_constant<int, 1>(), r0); break;
    case 2: fn(std::integral_constant<int, 2>(), r0); break;
    case 3: fn(std::integral_constant<int, 3>(), r0); break;
    case 4: fn(std::integral_constant<int, 4>(), r0); break;
    case 5: fn(std::integral_constant<int, 5>(), r0); break;
    case 6: fn(std::integral_constant<int, 6>(), r0); break;
    case 7: fn(std::integral_constant<int, 7>(), r0); break;
    default: break;
  }
}

// The scores of rows [begin, end), eight rows at a time.
void Estimate(const Job& jb, int64_t begin, int64_t end, std::vector<float>& t,
              std::vector<float>& z) {
  RowGroups(begin, end, [&](auto rows, int64_t r0) {
    constexpr int R = decltype(rows)::value;
    TimesU<R>(jb, r0, t.data());
    Scores<R>(jb, r0, t.data(), z.data());
  });
}

void RunChunks(Job& jb) {
  RowBuffers buf(jb.n_blocks);
  std::vector<float> t, z;
  if (jb.x != nullptr) {
    t.assign(8 * jb.rp, 0.f);
    z.assign(8 * jb.n_blocks * jb.bs, 0.f);
  }
  for (;;) {
    const int64_t c = jb.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= jb.n_chunks) return;
    const int64_t end = std::min(jb.rows, (c + 1) * jb.chunk);
    if (jb.x != nullptr) Estimate(jb, c * jb.chunk, end, t, z);
    for (int64_t r = c * jb.chunk; r < end; ++r) Row(jb, r, buf);
    jb.done.fetch_add(1, std::memory_order_release);
  }
}

// Splits jb's rows into chunks of at least `min_rows` (a multiple of `multiple`) and runs
// them on the caller and XLA:CPU's pool: helpers and the caller pull chunks from one
// counter (as in tile_product.cc), and the caller waits only for chunks already claimed.
void Launch(ffi::ThreadPool& pool, std::shared_ptr<Job> jb, int64_t min_rows, int64_t multiple) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t chunk = std::max(min_rows, (jb->rows + 2 * threads - 1) / (2 * threads));
  jb->chunk = (chunk + multiple - 1) / multiple * multiple;
  jb->n_chunks = (jb->rows + jb->chunk - 1) / jb->chunk;
  for (int64_t t = 1; t < threads && t < jb->n_chunks; ++t) pool.Schedule([jb] { RunChunks(*jb); });
  RunChunks(*jb);
  while (jb->done.load(std::memory_order_acquire) < jb->n_chunks) std::this_thread::yield();
}

std::shared_ptr<Job> NewJob(ffi::Buffer<ffi::F32>& z, ffi::Buffer<ffi::F32>& bias,
                            ffi::Buffer<ffi::F32>& threshold, ffi::ResultBuffer<ffi::F32>& y,
                            int64_t n_blocks, int64_t capacity) {
  auto jb = std::make_shared<Job>();
  jb->z = z.typed_data();
  jb->bias = bias.typed_data();
  jb->threshold = threshold.typed_data()[0];
  jb->y = y->typed_data();
  jb->rows = z.dimensions()[0];
  jb->n_blocks = n_blocks;
  jb->bs = z.dimensions()[1] / n_blocks;
  jb->capacity = capacity;
  return jb;
}

ffi::Error MaskedRelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> scores,
                      ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> threshold,
                      ffi::ResultBuffer<ffi::F32> y, int64_t capacity) {
  auto zd = z.dimensions(), sd = scores.dimensions(), bd = bias.dimensions();
  if (zd.size() != 2 || sd.size() != 2 || bd.size() != 1 || sd[0] != zd[0] || sd[1] < 1 ||
      zd[1] % sd[1] != 0 || bd[0] != zd[1] || threshold.element_count() != 1 || capacity < 0) {
    return ffi::Error::InvalidArgument("lrcc_masked_relu: inconsistent shapes");
  }
  auto jb = NewJob(z, bias, threshold, y, sd[1], capacity);
  jb->scores = scores.typed_data();
  if (jb->rows == 0) return ffi::Error::Success();
  // Chunks of at least 64k outputs: below that a second thread costs more than it saves.
  Launch(pool, jb, std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, zd[1])), 1);
  return ffi::Error::Success();
}

ffi::Error EstimatedMaskedRelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z,
                               ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                               ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias,
                               ffi::Buffer<ffi::F32> threshold, ffi::ResultBuffer<ffi::F32> y,
                               int64_t capacity, int64_t block_size) {
  auto zd = z.dimensions(), xd = x.dimensions(), ud = u.dimensions(), vd = v.dimensions();
  if (zd.size() != 2 || xd.size() != 2 || ud.size() != 2 || vd.size() != 2 ||
      bias.dimensions().size() != 1 || xd[0] != zd[0] || ud[0] != xd[1] || vd[0] != ud[1] ||
      vd[1] != zd[1] || bias.dimensions()[0] != zd[1] || block_size < 1 ||
      zd[1] % block_size != 0 || zd[1] < 1 || threshold.element_count() != 1 || capacity < 0) {
    return ffi::Error::InvalidArgument("lrcc_estimated_masked_relu: inconsistent shapes");
  }
  auto jb = NewJob(z, bias, threshold, y, zd[1] / block_size, capacity);
  if (jb->rows == 0) return ffi::Error::Success();
  const int64_t n_in = xd[1], r = ud[1], rp = (r + 15) / 16 * 16;
  std::vector<float> scores(jb->rows * jb->n_blocks), padded;
  if (rp != r) {  // zero columns up to a multiple of 16: whole vectors, no masked loads
    padded.assign(n_in * rp, 0.f);
    for (int64_t i = 0; i < n_in; ++i) {
      std::memcpy(padded.data() + i * rp, u.typed_data() + i * r, r * sizeof(float));
    }
  }
  jb->x = x.typed_data();
  jb->u = rp == r ? u.typed_data() : padded.data();
  jb->v = v.typed_data();
  jb->n_in = n_in;
  jb->r = r;
  jb->rp = rp;
  jb->est_scores = scores.data();
  jb->scores = scores.data();
  // A row costs its epilogue (n_out) and about r (n_in + n_out) / 16 vector multiply-adds;
  // chunks of at least 64k of those, in whole groups of eight rows.
  const int64_t per_row = zd[1] + r * (n_in + zd[1]) / 16;
  // (Splitting a few rows' estimate by columns instead ran 1.0-1.2x slower at 2-4 rows of
  // 1024-4096: the extra wake-ups cost more than the second core saved.)
  Launch(pool, jb, std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, per_row)), 8);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LrccMaskedRelu, MaskedRelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("capacity"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LrccEstimatedMaskedRelu, EstimatedMaskedRelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("capacity")
                                  .Attr<int64_t>("block_size"));
