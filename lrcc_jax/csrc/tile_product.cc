// Fused gather + multiply-reduce for input-sparse layers on XLA:CPU (see lrcc_jax/_native.py).
//
//   z[r, o, j] = sum_i sum_t W[out[r, o] * b_out + j, start[r, i] + t] * x[r, i * b_in + t]
//
// W is the unit-major (n_blocks, b_out, n_in) weight. Each (r, o) pair reads its b_out
// weight rows only at the active input runs, R rows at a time so that R independent
// streams are in flight, with a software prefetch two runs ahead. XLA:CPU materialises
// the same gather element by element before reducing it; this reads each tile once.
//
// W is f32 or bf16 (stored as uint16_t: the high half of an f32, so widening is a shift);
// x, z and every accumulation are f32.
//
// The shared targets (lrcc_tile_product_shared, lrcc_tile_product_bf16_shared) compute the same z in another order: the
// (r, o) pairs are grouped by their (clamped) block, and the pairs of one block of the union
// of the rows' selections run back to back on one thread, so the block is read from memory
// once and from cache by the others; threads split the union. Every output is summed by the
// same code in the same order as in the per-row targets, so the values are bit-identical.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

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

template <typename W>
struct Job {
  const W* w;
  const int32_t* out;
  const int32_t* start;
  const float* x;
  float* z;
  int64_t n_blocks, k, b_out, n_in, runs, b_in, pairs, chunk, n_chunks;
  // Shared mode: pairs ordered by block, and the start of each block's group in `order`.
  std::vector<int64_t> order, group;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

inline int64_t Clamp(int64_t v, int64_t hi) { return std::min(std::max<int64_t>(v, 0), hi); }

// Rows [j0, j0 + R) of one (r, o) pair; B is the run length (b_in), or 0 for any length,
// which accumulates in vectors of 16 and finishes the tail scalar.
template <int R, int B, typename W>
void Rows(const Job<W>& jb, const W* wb, const int64_t* st, const float* xr, float* zp, int64_t j0) {
  constexpr int A = B > 0 ? B : 16;
  const int64_t b = B > 0 ? B : jb.b_in;
  float acc[R][A] = {};
  float tail[R] = {};
  for (int64_t i = 0; i < jb.runs; ++i) {
    const float* xs = xr + i * b;
    if (i + 2 < jb.runs) {
      for (int q = 0; q < R; ++q) __builtin_prefetch(wb + (j0 + q) * jb.n_in + st[i + 2]);
    }
    for (int q = 0; q < R; ++q) {
      const W* ws = wb + (j0 + q) * jb.n_in + st[i];
      if constexpr (B > 0) {
        for (int t = 0; t < B; ++t) acc[q][t] += Load(ws + t) * xs[t];
      } else {
        int64_t t = 0;
        for (; t + A <= b; t += A) {
          for (int u = 0; u < A; ++u) acc[q][u] += Load(ws + t + u) * xs[t + u];
        }
        for (; t < b; ++t) tail[q] += Load(ws + t) * xs[t];
      }
    }
  }
  for (int q = 0; q < R; ++q) {
    float s = tail[q];
    for (int t = 0; t < A; ++t) s += acc[q][t];
    zp[j0 + q] = s;
  }
}

template <int B, typename W>
void Pair(const Job<W>& jb, int64_t p, int64_t* st) {
  constexpr int R = 4;
  const int64_t r = p / jb.k;
  for (int64_t i = 0; i < jb.runs; ++i) st[i] = Clamp(jb.start[r * jb.runs + i], jb.n_in - jb.b_in);
  const float* xr = jb.x + r * jb.runs * jb.b_in;
  const W* wb = jb.w + Clamp(jb.out[p], jb.n_blocks - 1) * jb.b_out * jb.n_in;
  float* zp = jb.z + p * jb.b_out;
  int64_t j = 0;
  for (; j + R <= jb.b_out; j += R) Rows<R, B, W>(jb, wb, st, xr, zp, j);
  for (; j < jb.b_out; ++j) Rows<1, B, W>(jb, wb, st, xr, zp, j);
}

template <typename W>
void RunChunks(Job<W>& jb) {
  std::unique_ptr<int64_t[]> st(new int64_t[std::max<int64_t>(jb.runs, 1)]);
  for (;;) {
    const int64_t c = jb.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= jb.n_chunks) return;
    const int64_t end = std::min(jb.pairs, (c + 1) * jb.chunk);
    for (int64_t p = c * jb.chunk; p < end; ++p) {
      switch (jb.b_in) {
        case 4: Pair<4, W>(jb, p, st.get()); break;
        case 8: Pair<8, W>(jb, p, st.get()); break;
        case 16: Pair<16, W>(jb, p, st.get()); break;
        case 32: Pair<32, W>(jb, p, st.get()); break;
        case 64: Pair<64, W>(jb, p, st.get()); break;
        default: Pair<0, W>(jb, p, st.get());
      }
    }
    jb.done.fetch_add(1, std::memory_order_release);
  }
}

template <typename W>
void RunGroups(Job<W>& jb) {
  std::unique_ptr<int64_t[]> st(new int64_t[std::max<int64_t>(jb.runs, 1)]);
  const int64_t groups = static_cast<int64_t>(jb.group.size()) - 1;
  for (;;) {
    const int64_t c = jb.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= jb.n_chunks) return;
    const int64_t end = std::min(groups, (c + 1) * jb.chunk);
    // One block's pairs back to back: the block (b_out x n_in, 256 KB at 16 x 4096 f32)
    // is read from memory by the first and found in cache by the others.
    for (int64_t q = jb.group[c * jb.chunk]; q < jb.group[end]; ++q) {
      const int64_t p = jb.order[q];
      switch (jb.b_in) {
        case 4: Pair<4, W>(jb, p, st.get()); break;
        case 8: Pair<8, W>(jb, p, st.get()); break;
        case 16: Pair<16, W>(jb, p, st.get()); break;
        case 32: Pair<32, W>(jb, p, st.get()); break;
        case 64: Pair<64, W>(jb, p, st.get()); break;
        default: Pair<0, W>(jb, p, st.get());
      }
    }
    jb.done.fetch_add(1, std::memory_order_release);
  }
}

// Shared mode's schedule: a stable counting sort of the pairs by clamped block (so within a
// block the pairs keep their row order), and one group per block of the union.
template <typename W>
void GroupByBlock(Job<W>& jb) {
  std::vector<int64_t> count(jb.n_blocks + 1, 0);
  for (int64_t p = 0; p < jb.pairs; ++p) ++count[Clamp(jb.out[p], jb.n_blocks - 1) + 1];
  for (int64_t b = 0; b < jb.n_blocks; ++b) count[b + 1] += count[b];
  jb.order.resize(jb.pairs);
  std::vector<int64_t> fill(count.begin(), count.end() - 1);
  for (int64_t p = 0; p < jb.pairs; ++p) jb.order[fill[Clamp(jb.out[p], jb.n_blocks - 1)]++] = p;
  jb.group.clear();
  for (int64_t b = 0; b < jb.n_blocks; ++b) {
    if (count[b + 1] > count[b]) jb.group.push_back(count[b]);
  }
  jb.group.push_back(jb.pairs);
}

template <ffi::DataType T>
ffi::Error TileProduct(ffi::ThreadPool pool, ffi::Buffer<T> weight,
                       ffi::Buffer<ffi::S32> out_blocks, ffi::Buffer<ffi::S32> starts,
                       ffi::Buffer<ffi::F32> values, ffi::ResultBuffer<ffi::F32> z,
                       int64_t b_in, bool shared) {
  auto wd = weight.dimensions(), od = out_blocks.dimensions(), sd = starts.dimensions(),
       vd = values.dimensions();
  if (wd.size() != 3 || od.size() != 2 || sd.size() != 2 || vd.size() != 2 || b_in < 1 ||
      sd[0] != od[0] || vd[0] != od[0] || vd[1] != sd[1] * b_in || b_in > wd[2]) {
    return ffi::Error::InvalidArgument("lrcc_tile_product: inconsistent shapes");
  }
  using W = ffi::NativeType<T>;
  auto jb = std::make_shared<Job<W>>();
  jb->w = weight.typed_data();
  jb->out = out_blocks.typed_data();
  jb->start = starts.typed_data();
  jb->x = values.typed_data();
  jb->z = z->typed_data();
  jb->n_blocks = wd[0];
  jb->b_out = wd[1];
  jb->n_in = wd[2];
  jb->k = od[1];
  jb->runs = sd[1];
  jb->b_in = b_in;
  jb->pairs = od[0] * od[1];
  if (jb->pairs == 0) return ffi::Error::Success();
  if (jb->n_blocks == 0) return ffi::Error::InvalidArgument("lrcc_tile_product: no blocks");
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (shared) GroupByBlock(*jb);
  const int64_t items = shared ? static_cast<int64_t>(jb->group.size()) - 1 : jb->pairs;
  jb->chunk = std::max<int64_t>(1, items / (4 * threads));
  jb->n_chunks = (items + jb->chunk - 1) / jb->chunk;
  // Helpers and the caller pull chunks from one counter. The caller then waits only for
  // chunks a helper has already claimed (running, so they finish): a helper that starts
  // late finds no work, and nothing here can wait on a task still in the pool's queue.
  auto work = [jb, shared] { shared ? RunGroups(*jb) : RunChunks(*jb); };
  for (int64_t t = 1; t < threads && t < jb->n_chunks; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (jb->done.load(std::memory_order_acquire) < jb->n_chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

template <ffi::DataType T>
ffi::Error PerRow(ffi::ThreadPool pool, ffi::Buffer<T> weight, ffi::Buffer<ffi::S32> out_blocks,
                  ffi::Buffer<ffi::S32> starts, ffi::Buffer<ffi::F32> values,
                  ffi::ResultBuffer<ffi::F32> z, int64_t b_in) {
  return TileProduct<T>(pool, weight, out_blocks, starts, values, z, b_in, false);
}

template <ffi::DataType T>
ffi::Error Shared(ffi::ThreadPool pool, ffi::Buffer<T> weight, ffi::Buffer<ffi::S32> out_blocks,
                  ffi::Buffer<ffi::S32> starts, ffi::Buffer<ffi::F32> values,
                  ffi::ResultBuffer<ffi::F32> z, int64_t b_in) {
  return TileProduct<T>(pool, weight, out_blocks, starts, values, z, b_in, true);
}

}  // namespace

// One binding for the four targets: (weight, out_blocks, starts, values) -> z, attr b_in.
#define LRCC_TILE_HANDLER(NAME, FN, T)                           \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, FN<T>,                     \
                                ffi::Ffi::Bind()                 \
                                    .Ctx<ffi::ThreadPool>()      \
                                    .Arg<ffi::Buffer<T>>()       \
                                    .Arg<ffi::Buffer<ffi::S32>>() \
                                    .Arg<ffi::Buffer<ffi::S32>>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>() \
                                    .Attr<int64_t>("b_in"));

LRCC_TILE_HANDLER(LrccTileProduct, PerRow, ffi::F32)
LRCC_TILE_HANDLER(LrccTileProductBf16, PerRow, ffi::BF16)
LRCC_TILE_HANDLER(LrccTileProductShared, Shared, ffi::F32)
LRCC_TILE_HANDLER(LrccTileProductSharedBf16, Shared, ffi::BF16)
