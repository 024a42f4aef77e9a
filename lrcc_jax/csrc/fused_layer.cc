// One conditional ReLU layer in one XLA:CPU call (see lrcc_jax/_fused.py for the math).
//
// Per row: the estimate t = x U (dense x, or the active inputs' rows of U scaled by their
// values), zhat = t V + b, block scores (max over a block's units, NaN if any unit is NaN),
// the capacity's top-k blocks (NaN ranked as +inf, -0 below +0, ties to the lower index,
// output ascending), keep = !(score <= threshold), and for the kept blocks
// relu(W_block x + b_block) from the unit-major weights (n_blocks, bs, n_in); blocks not
// kept are zero and not computed. A string of XLA ops costs microseconds of fixed overhead
// per op at batch 1; this is one call.
//
// Sparse inputs come as (indices, values) in runs of b_in consecutive units starting at
// indices[r, i * b_in]; the exact product reads only those columns of the selected rows.
// W is f32 or bf16 (uint16_t: the high half of an f32, widened by a shift); everything
// else, and every accumulation, is f32.
//
// Small work runs on the calling thread; above a work size each phase is split into
// chunks that the caller and the XLA intra-op pool's threads pull from one counter.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "estimate.h"
#include "topk.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float Load(const float* p) { return *p; }
inline float Load(const uint16_t* p) {
  const uint32_t bits = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline int64_t Clamp(int64_t v, int64_t hi) { return std::min(std::max<int64_t>(v, 0), hi); }

// 16 floats; GCC/Clang vector extension (one AVX-512 register, two AVX2 ones, ...).
typedef float V16 __attribute__((vector_size(64)));

inline V16 Load16(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void AddStore16(float* p, V16 v) {
  V16 old = Load16(p);
  old += v;
  std::memcpy(p, &old, sizeof old);
}

inline V16 LoadW16(const float* p) { return Load16(p); }
inline V16 LoadW16(const uint16_t* p) {
  uint32_t bits[16];
  for (int i = 0; i < 16; ++i) bits[i] = static_cast<uint32_t>(p[i]) << 16;
  V16 v;
  std::memcpy(&v, bits, sizeof v);
  return v;
}

// Multiply-adds below which a phase runs on the calling thread: waking a pool thread costs
// a few microseconds. 2^18 keeps the paper net's layers (at most ~10^5 per phase) on one
// thread and splits 4096-wide ones (x U and t V alone are 2^18 at rank 64); at 2^21 a
// 4096-wide layer ran single-threaded and lost to the two-core tile kernel.
constexpr int64_t kParallelWork = 1 << 18;

// Runs fn(0..n-1); in the pool when `work` (multiply-adds) is large and n > 1.
struct Shared {
  std::function<void(int64_t)> fn;
  int64_t n;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void Drain(Shared& s) {
  for (;;) {
    const int64_t c = s.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= s.n) return;
    s.fn(c);
    s.done.fetch_add(1, std::memory_order_release);
  }
}

void ParallelFor(ffi::ThreadPool* pool, int64_t n, int64_t work,
                 const std::function<void(int64_t)>& fn) {
  const int64_t threads = pool == nullptr ? 1 : std::max<int64_t>(1, pool->num_threads());
  if (n <= 1 || work < kParallelWork || threads == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto s = std::make_shared<Shared>();
  s->fn = fn;
  s->n = n;
  // The caller waits only for chunks a helper has claimed (running, so they finish).
  for (int64_t t = 1; t < threads && t < n; ++t) pool->Schedule([s] { Drain(*s); });
  Drain(*s);
  while (s->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

template <typename W>
struct Layer {
  const float* x;       // dense (rows, n_in) or sparse values (rows, m)
  const int32_t* xi;    // sparse indices (rows, m), or null for dense rows
  const float* u;       // (n_in, r)
  const float* v;       // (r, n_out)
  const float* bias;    // (n_out,)
  const W* w;           // (n_blocks, bs, n_in)
  float threshold;
  int64_t rows, n_in, m, b_in, r, n_out, bs, n_blocks, k;
  int32_t* idx;         // (rows, k)
  float* vals;          // (rows, k, bs)
};

// out[q] = dot(w[q] at the input runs, xr) for R weight rows at once (R streams in
// flight). Dense input: one run of b = n_in at 0. Sparse: `runs` runs of B (0: any length
// b) starting at `st`; B = 1 reads single elements.
template <int R, int B, typename W>
void Dots(const W* const* w, const int64_t* st, int64_t runs, int64_t b, const float* xr,
          float* const* out) {
  if constexpr (B == 1) {
    float acc[R][2] = {};
    int64_t i = 0;
    for (; i + 2 <= runs; i += 2) {
      for (int q = 0; q < R; ++q) {
        acc[q][0] += Load(w[q] + st[i]) * xr[i];
        acc[q][1] += Load(w[q] + st[i + 1]) * xr[i + 1];
      }
    }
    for (; i < runs; ++i) {
      for (int q = 0; q < R; ++q) acc[q][0] += Load(w[q] + st[i]) * xr[i];
    }
    for (int q = 0; q < R; ++q) *out[q] = acc[q][0] + acc[q][1];
    return;
  } else {
    constexpr int A = B > 0 ? B : 16;
    float acc[R][A] = {};
    V16 vacc[R] = {};
    float tail[R] = {};
    for (int64_t i = 0; i < runs; ++i) {
      const float* xs = xr + i * b;
      if (i + 2 < runs) {
        for (int q = 0; q < R; ++q) __builtin_prefetch(w[q] + st[i + 2]);
      }
      if constexpr (B > 0) {
        for (int q = 0; q < R; ++q) {
          const W* ws = w[q] + st[i];
          for (int t = 0; t < B; ++t) acc[q][t] += Load(ws + t) * xs[t];
        }
      } else {  // the R rows advance together: R streams in flight, not one
        int64_t t = 0;
        for (; t + 16 <= b; t += 16) {
          const V16 xv = Load16(xs + t);
          for (int q = 0; q < R; ++q) vacc[q] += LoadW16(w[q] + st[i] + t) * xv;
        }
        for (; t < b; ++t) {
          for (int q = 0; q < R; ++q) tail[q] += Load(w[q] + st[i] + t) * xs[t];
        }
      }
    }
    for (int q = 0; q < R; ++q) {
      float s = tail[q];
      for (int t = 0; t < A; ++t) s += acc[q][t] + vacc[q][t];
      *out[q] = s;
    }
  }
}

template <int R, typename W>
void DotsFor(int64_t b_in, bool sparse, const W* const* w, const int64_t* st, int64_t runs,
             int64_t b, const float* xr, float* const* out) {
  if (!sparse) return Dots<R, 0, W>(w, st, runs, b, xr, out);
  switch (b_in) {
    case 1: return Dots<R, 1, W>(w, st, runs, b, xr, out);
    case 2: return Dots<R, 2, W>(w, st, runs, b, xr, out);
    case 4: return Dots<R, 4, W>(w, st, runs, b, xr, out);
    case 8: return Dots<R, 8, W>(w, st, runs, b, xr, out);
    case 16: return Dots<R, 16, W>(w, st, runs, b, xr, out);
    case 32: return Dots<R, 32, W>(w, st, runs, b, xr, out);
    default: return Dots<R, 0, W>(w, st, runs, b, xr, out);
  }
}

// Weight rows waiting for their dot products with one input row, run kRows at a time.
constexpr int kRows = 4;
template <typename W>
struct Pending {
  const W* w[kRows];
  float* out[kRows];
  int n = 0;
};

// Dense rows from which the estimate runs eight rows at a time (estimate.h). Fewer rows
// keep the per-row phases below: one row in groups of eight would leave seven idle, and at
// one row the per-row phases split the inputs over the pool.
constexpr int64_t kGroupedRows = 8;

// Inputs per chunk of the estimate's first product, and units per chunk of the second.
constexpr int64_t kInChunk = 512;
constexpr int64_t kUnitChunk = 512;

#ifdef __AVX512F__
template <int C, typename Unit>
void InputTimesUGroup(const float* xr, Unit unit, const float* u, int64_t r, int64_t q0,
                      int64_t width, int64_t begin, int64_t end, float* acc) {
  const __mmask16 last =
      (width % 16) == 0 ? static_cast<__mmask16>(0xFFFF)
                        : static_cast<__mmask16>((1u << (width % 16)) - 1);
  auto mask = [&](int c) { return c == C - 1 ? last : static_cast<__mmask16>(0xFFFF); };
  __m512 a[4][C];
  for (int s = 0; s < 4; ++s)
    for (int c = 0; c < C; ++c) a[s][c] = _mm512_setzero_ps();
  int64_t i = begin;
  for (; i + 4 <= end; i += 4) {
    for (int s = 0; s < 4; ++s) {
      const float* ui = u + unit(i + s) * r + q0;
      const __m512 xv = _mm512_set1_ps(xr[i + s]);
      for (int c = 0; c < C; ++c) {
        a[s][c] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(mask(c), ui + 16 * c), a[s][c]);
      }
    }
  }
  for (; i < end; ++i) {
    const float* ui = u + unit(i) * r + q0;
    const __m512 xv = _mm512_set1_ps(xr[i]);
    for (int c = 0; c < C; ++c) {
      a[0][c] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(mask(c), ui + 16 * c), a[0][c]);
    }
  }
  for (int c = 0; c < C; ++c) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(a[0][c], a[1][c]),
                                     _mm512_add_ps(a[2][c], a[3][c]));
    float* p = acc + q0 + 16 * c;
    _mm512_mask_storeu_ps(p, mask(c),
                          _mm512_add_ps(_mm512_maskz_loadu_ps(mask(c), p), sum));
  }
}
#endif

template <typename W>
void InputTimesU(const Layer<W>& L, int64_t row, int64_t begin, int64_t end, float* acc) {
  const int64_t r = L.r;
  const float* xr = L.x + row * L.m;
  const int32_t* ir = L.xi == nullptr ? nullptr : L.xi + row * L.m;
#ifdef __AVX512F__
  auto go = [&](auto unit) {
    for (int64_t q0 = 0; q0 < r; q0 += 64) {
      const int64_t width = std::min<int64_t>(64, r - q0);
      switch ((width + 15) / 16) {
        case 1: InputTimesUGroup<1>(xr, unit, L.u, r, q0, width, begin, end, acc); break;
        case 2: InputTimesUGroup<2>(xr, unit, L.u, r, q0, width, begin, end, acc); break;
        case 3: InputTimesUGroup<3>(xr, unit, L.u, r, q0, width, begin, end, acc); break;
        default: InputTimesUGroup<4>(xr, unit, L.u, r, q0, width, begin, end, acc); break;
      }
    }
  };
  if (ir == nullptr) {
    go([](int64_t i) { return i; });
  } else {
    const int64_t hi = L.n_in - 1;
    go([ir, hi](int64_t i) { return Clamp(ir[i], hi); });
  }
#else
  auto unit = [&](int64_t i) { return ir == nullptr ? i : Clamp(ir[i], L.n_in - 1); };
  int64_t q0 = 0;
  for (; q0 + 16 <= r; q0 += 16) {
    V16 a[4] = {};
    int64_t i = begin;
    for (; i + 4 <= end; i += 4) {
      for (int s = 0; s < 4; ++s) a[s] += xr[i + s] * Load16(L.u + unit(i + s) * r + q0);
    }
    for (; i < end; ++i) a[0] += xr[i] * Load16(L.u + unit(i) * r + q0);
    AddStore16(acc + q0, (a[0] + a[1]) + (a[2] + a[3]));
  }
  if (q0 < r) {
    float tail[16] = {};
    for (int64_t i = begin; i < end; ++i) {
      const float* ui = L.u + unit(i) * r;
      for (int64_t q = q0; q < r; ++q) tail[q - q0] += xr[i] * ui[q];
    }
    for (int64_t q = q0; q < r; ++q) acc[q] += tail[q - q0];
  }
#endif
}

// z[0, width) = t V[:, j0 : j0 + width]: 64 columns at a time in four accumulators.
template <typename W>
void TimesV(const Layer<W>& L, const float* t, int64_t j0, int64_t width, float* z) {
  const int64_t r = L.r, n_out = L.n_out;
  int64_t j = 0;
  for (; j + 64 <= width; j += 64) {
    V16 a[4] = {};
    for (int64_t q = 0; q < r; ++q) {
      const float* vq = L.v + q * n_out + j0 + j;
      for (int s = 0; s < 4; ++s) a[s] += t[q] * Load16(vq + 16 * s);
    }
    std::memcpy(z + j, a, sizeof a);
  }
  for (; j + 16 <= width; j += 16) {
    V16 a = {};
    for (int64_t q = 0; q < r; ++q) a += t[q] * Load16(L.v + q * n_out + j0 + j);
    std::memcpy(z + j, &a, sizeof a);
  }
  for (; j < width; ++j) {
    float s = 0.f;
    for (int64_t q = 0; q < r; ++q) s += t[q] * L.v[q * n_out + j0 + j];
    z[j] = s;
  }
}

template <typename W>
ffi::Error Run(ffi::ThreadPool* pool, const Layer<W>& L) {
  const int64_t rows = L.rows, r = L.r, n_out = L.n_out, bs = L.bs, k = L.k;
  const int64_t n_blocks = L.n_blocks, m = L.m;
  const bool sparse = L.xi != nullptr;
  std::vector<float> scores(rows * n_blocks);
  if (!sparse && rows >= kGroupedRows) {
    // 1-2. Eight rows at a time (estimate.h): each load of U and V feeds eight rows.
    const int64_t rp = (r + 15) / 16 * 16;
    std::vector<float> padded;
    const float* u = lrcc_estimate::PaddedU(L.u, m, r, rp, padded);  // whole vectors
    const lrcc_estimate::Estimator e{L.x, m, u, rp, r, L.v, L.bias, n_blocks, bs, scores.data()};
    ParallelFor(pool, (rows + 7) / 8, rows * r * (m + n_out), [&](int64_t g) {
      std::vector<float> t(8 * rp), z(8 * n_out);
      lrcc_estimate::EstimateRows(e, 8 * g, std::min(rows, 8 * g + 8), t.data(), z.data());
    });
  } else {
    // 1. t = x U, as partial sums over chunks of inputs (summed in chunk order below).
    const int64_t in_chunks = std::max<int64_t>(1, (m + kInChunk - 1) / kInChunk);
    std::vector<float> partial(rows * in_chunks * r, 0.f);
    ParallelFor(pool, rows * in_chunks, rows * m * r, [&](int64_t task) {
      const int64_t row = task / in_chunks, c = task % in_chunks;
      const int64_t begin = c * kInChunk, end = std::min(m, (c + 1) * kInChunk);
      InputTimesU(L, row, begin, end, partial.data() + task * r);
    });
    std::vector<float> t(rows * r, 0.f);
    for (int64_t row = 0; row < rows; ++row) {
      for (int64_t c = 0; c < in_chunks; ++c) {
        const float* p = partial.data() + (row * in_chunks + c) * r;
        for (int64_t q = 0; q < r; ++q) t[row * r + q] += p[q];
      }
    }
    // 2. zhat = t V + b and block scores, in chunks of whole blocks.
    const int64_t blocks_per_chunk = std::max<int64_t>(1, kUnitChunk / bs);
    const int64_t unit_chunks = (n_blocks + blocks_per_chunk - 1) / blocks_per_chunk;
    ParallelFor(pool, rows * unit_chunks, rows * r * n_out, [&](int64_t task) {
      const int64_t row = task / unit_chunks, c = task % unit_chunks;
      const int64_t b0 = c * blocks_per_chunk, b1 = std::min(n_blocks, b0 + blocks_per_chunk);
      const int64_t j0 = b0 * bs, width = (b1 - b0) * bs;
      float z[kUnitChunk + 64];
      TimesV(L, t.data() + row * r, j0, width, z);
      lrcc_estimate::BlockScores(z, L.bias + j0, b1 - b0, bs, scores.data() + row * n_blocks + b0);
    });
  }
  // 3. Selection: the k best blocks of each row, ascending. The bisection of topk.h finds
  // the k-th best key; one ascending scan then takes every block above it and the
  // lowest-indexed ties (no index sort).
  ParallelFor(pool, rows, rows * n_blocks * 8, [&](int64_t row) {
    lrcc_topk::TopKBuffers buf(k >= n_blocks ? 0 : n_blocks);
    lrcc_topk::TopKIndices(scores.data() + row * n_blocks, n_blocks, k, L.idx + row * k, buf);
  });
  // 4. Exact products of the kept blocks: relu(W_block x + b), zero where not kept.
  const int64_t runs = sparse ? m / L.b_in : 1;
  std::vector<int64_t> starts(rows * runs, 0);
  if (sparse) {
    for (int64_t row = 0; row < rows; ++row) {
      for (int64_t i = 0; i < runs; ++i) {
        starts[row * runs + i] = Clamp(L.xi[row * m + i * L.b_in], L.n_in - L.b_in);
      }
    }
  }
  // Single-element sparse inputs covering a quarter of the row or more are scattered into a
  // dense row: streaming whole weight rows then beats one gathered load per input.
  const bool densify = sparse && L.b_in == 1 && 4 * m >= L.n_in;
  std::vector<float> dense_x;
  if (densify) {
    dense_x.assign(rows * L.n_in, 0.f);
    for (int64_t row = 0; row < rows; ++row) {
      for (int64_t i = 0; i < m; ++i) {
        dense_x[row * L.n_in + Clamp(L.xi[row * m + i], L.n_in - 1)] += L.x[row * m + i];
      }
    }
  }
  const bool dense_rows = !sparse || densify;
  const float* xs_base = densify ? dense_x.data() : L.x;
  const int64_t x_stride = densify ? L.n_in : m;
  const int64_t n_runs = dense_rows ? 1 : runs;
  if (densify) std::fill(starts.begin(), starts.end(), 0);
  const int64_t pairs = rows * k;
  const int64_t per_pair = bs * m;
  const int64_t threads = pool == nullptr ? 1 : std::max<int64_t>(1, pool->num_threads());
  const int64_t chunk = std::max<int64_t>(1, pairs / (4 * threads));
  const int64_t n_chunks = (pairs + chunk - 1) / chunk;
  const int64_t b = dense_rows ? L.n_in : L.b_in;
  ParallelFor(pool, n_chunks, pairs * per_pair, [&](int64_t c) {
    const int64_t end = std::min(pairs, (c + 1) * chunk);
    Pending<W> pend;
    int64_t pend_row = -1;
    auto flush = [&]() {
      const int64_t* st = starts.data() + pend_row * runs;
      const float* xr = xs_base + pend_row * x_stride;
      if (pend.n == kRows) {
        DotsFor<kRows, W>(L.b_in, !dense_rows, pend.w, st, n_runs, b, xr, pend.out);
      } else {
        for (int q = 0; q < pend.n; ++q) {
          DotsFor<1, W>(L.b_in, !dense_rows, pend.w + q, st, n_runs, b, xr, pend.out + q);
        }
      }
      pend.n = 0;
    };
    for (int64_t p = c * chunk; p < end; ++p) {
      const int64_t row = p / k;
      const int64_t blk = L.idx[p];
      float* out = L.vals + p * bs;
      if (scores[row * n_blocks + blk] <= L.threshold) {  // not kept (a NaN score is kept)
        std::fill(out, out + bs, 0.f);
        continue;
      }
      if (row != pend_row && pend.n > 0) flush();
      pend_row = row;
      for (int64_t j = 0; j < bs; ++j) {
        pend.w[pend.n] = L.w + (blk * bs + j) * L.n_in;
        pend.out[pend.n] = out + j;
        if (++pend.n == kRows) flush();
      }
    }
    if (pend.n > 0) flush();
    // Bias and relu over the chunk's kept blocks (not-kept ones are already zero).
    for (int64_t p = c * chunk; p < end; ++p) {
      const int64_t row = p / k;
      const int64_t blk = L.idx[p];
      if (scores[row * n_blocks + blk] <= L.threshold) continue;
      float* out = L.vals + p * bs;
      for (int64_t j = 0; j < bs; ++j) {
        const float z = out[j] + L.bias[blk * bs + j];
        out[j] = (z > 0.f || std::isnan(z)) ? z : 0.f;
      }
    }
  });
  return ffi::Error::Success();
}

template <ffi::DataType T>
ffi::Error FusedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, const int32_t* xi,
                     int64_t b_in, ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> v,
                     ffi::Buffer<ffi::F32> bias, ffi::Buffer<T> weight,
                     ffi::Buffer<ffi::F32> threshold, ffi::ResultBuffer<ffi::S32> idx,
                     ffi::ResultBuffer<ffi::F32> vals, int64_t capacity) {
  auto xd = x.dimensions(), ud = u.dimensions(), vd = v.dimensions(), wd = weight.dimensions();
  if (xd.size() != 2 || ud.size() != 2 || vd.size() != 2 || wd.size() != 3 ||
      ud[1] != vd[0] || ud[0] != wd[2] || vd[1] != wd[0] * wd[1] ||
      bias.element_count() != vd[1] || threshold.element_count() != 1 || capacity < 1 ||
      capacity > wd[0] || b_in < 1 || xd[1] % b_in != 0 || b_in > wd[2] ||
      (xi == nullptr && xd[1] != wd[2])) {
    return ffi::Error::InvalidArgument("lrcc_fused_layer: inconsistent shapes");
  }
  using W = ffi::NativeType<T>;
  Layer<W> L;
  L.x = x.typed_data();
  L.xi = xi;
  L.u = u.typed_data();
  L.v = v.typed_data();
  L.bias = bias.typed_data();
  L.w = weight.typed_data();
  L.threshold = threshold.typed_data()[0];
  L.rows = xd[0];
  L.m = xd[1];
  L.b_in = b_in;
  L.n_in = wd[2];
  L.r = ud[1];
  L.n_out = vd[1];
  L.bs = wd[1];
  L.n_blocks = wd[0];
  L.k = capacity;
  L.idx = idx->typed_data();
  L.vals = vals->typed_data();
  if (L.rows == 0) return ffi::Error::Success();
  return Run<W>(&pool, L);
}

template <ffi::DataType T>
ffi::Error FusedDense(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                      ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias, ffi::Buffer<T> weight,
                      ffi::Buffer<ffi::F32> threshold, ffi::ResultBuffer<ffi::S32> idx,
                      ffi::ResultBuffer<ffi::F32> vals, int64_t capacity) {
  return FusedImpl<T>(pool, x, nullptr, 1, u, v, bias, weight, threshold, idx, vals, capacity);
}

template <ffi::DataType T>
ffi::Error FusedSparse(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> indices,
                       ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::F32> u,
                       ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias, ffi::Buffer<T> weight,
                       ffi::Buffer<ffi::F32> threshold, ffi::ResultBuffer<ffi::S32> idx,
                       ffi::ResultBuffer<ffi::F32> vals, int64_t capacity, int64_t b_in) {
  if (indices.dimensions().size() != 2 || values.dimensions().size() != 2 ||
      indices.dimensions()[0] != values.dimensions()[0] ||
      indices.dimensions()[1] != values.dimensions()[1]) {
    return ffi::Error::InvalidArgument("lrcc_fused_sparse_layer: indices and values differ");
  }
  return FusedImpl<T>(pool, values, indices.typed_data(), b_in, u, v, bias, weight, threshold,
                      idx, vals, capacity);
}

}  // namespace

#define LRCC_DENSE_BINDING(T)                  \
  ffi::Ffi::Bind()                             \
      .Ctx<ffi::ThreadPool>()                  \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Arg<ffi::Buffer<T>>()                   \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Ret<ffi::Buffer<ffi::S32>>()            \
      .Ret<ffi::Buffer<ffi::F32>>()            \
      .Attr<int64_t>("capacity")

#define LRCC_SPARSE_BINDING(T)                 \
  ffi::Ffi::Bind()                             \
      .Ctx<ffi::ThreadPool>()                  \
      .Arg<ffi::Buffer<ffi::S32>>()            \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Arg<ffi::Buffer<T>>()                   \
      .Arg<ffi::Buffer<ffi::F32>>()            \
      .Ret<ffi::Buffer<ffi::S32>>()            \
      .Ret<ffi::Buffer<ffi::F32>>()            \
      .Attr<int64_t>("capacity")               \
      .Attr<int64_t>("b_in")

XLA_FFI_DEFINE_HANDLER_SYMBOL(LrccFusedLayer, FusedDense<ffi::F32>, LRCC_DENSE_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LrccFusedLayerBf16, FusedDense<ffi::BF16>,
                              LRCC_DENSE_BINDING(ffi::BF16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LrccFusedSparseLayer, FusedSparse<ffi::F32>,
                              LRCC_SPARSE_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LrccFusedSparseLayerBf16, FusedSparse<ffi::BF16>,
                              LRCC_SPARSE_BINDING(ffi::BF16));
