// The output projection of a gathered transformer FFN on XLA:CPU (see lrcc_jax/_ffn.py).
//
//   y[r, c] = sum_k sum_j h[r, k, j] * W[idx[r, k], j, c]
//
// W is the output projection in its (n_blocks, bs, d_out) layout: hidden unit
// idx * bs + j owns one contiguous row of d_out weights. Only the rows of selected blocks
// are read, and of those only the rows whose coefficient h is nonzero (a ReLU zero inside
// a selected block multiplies a row by 0, which adds nothing for finite weights; a NaN
// coefficient is kept, so a NaN still reaches y). The d_out columns are split into chunks
// across the XLA:CPU thread pool; each chunk accumulates four weight rows per pass into
// its slice of y, which stays in L1. Small products run on the calling thread.
//
// W is f32 or bf16 (stored as uint16_t: the high half of an f32, so widening is a shift);
// h, y and every accumulation are f32.

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

inline float Widen(float w) { return w; }
inline float Widen(uint16_t w) {
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Below this many multiply-adds (rows * selected rows * d_out) one thread does it all:
// handing work to the pool costs more than it saves (a 512-unit FFN at 25%: 128 rows x 128).
constexpr int64_t kMinParallelWork = 1 << 17;
// Columns per work item: at least this many (64 B lines, vector loops), at most one
// item per thread and a few more for balance.
constexpr int64_t kMinChunkCols = 64;

template <typename W>
struct OutJob {
  const W* w;
  const int32_t* idx;
  const float* h;
  float* y;
  int64_t n_blocks, bs, d_out, k, chunk, col_chunks, n_items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// y[r, c0:c0+n] for one row r: the weighted sum of its nonzero rows, four at a time.
template <typename W>
void Item(const OutJob<W>& jb, int64_t item, std::vector<const W*>& ptr,
          std::vector<float>& coef) {
  const int64_t r = item / jb.col_chunks;
  const int64_t c0 = (item % jb.col_chunks) * jb.chunk;
  const int64_t n = std::min(jb.chunk, jb.d_out - c0);
  const float* hr = jb.h + r * jb.k * jb.bs;
  const int32_t* ir = jb.idx + r * jb.k;
  int64_t m = 0;
  for (int64_t q = 0; q < jb.k; ++q) {
    const int64_t b = std::min<int64_t>(std::max<int32_t>(ir[q], 0), jb.n_blocks - 1);
    const W* base = jb.w + b * jb.bs * jb.d_out + c0;
    for (int64_t j = 0; j < jb.bs; ++j) {
      const float a = hr[q * jb.bs + j];
      if (a != 0.0f) {  // NaN != 0: kept
        ptr[m] = base + j * jb.d_out;
        coef[m] = a;
        ++m;
      }
    }
  }
  float* __restrict__ yr = jb.y + r * jb.d_out + c0;
  std::fill(yr, yr + n, 0.0f);
  int64_t q = 0;
  for (; q + 4 <= m; q += 4) {
    const W* __restrict__ p0 = ptr[q];
    const W* __restrict__ p1 = ptr[q + 1];
    const W* __restrict__ p2 = ptr[q + 2];
    const W* __restrict__ p3 = ptr[q + 3];
    const float a0 = coef[q], a1 = coef[q + 1], a2 = coef[q + 2], a3 = coef[q + 3];
    for (int64_t c = 0; c < n; ++c) {
      yr[c] += a0 * Widen(p0[c]) + a1 * Widen(p1[c]) + a2 * Widen(p2[c]) + a3 * Widen(p3[c]);
    }
  }
  for (; q < m; ++q) {
    const W* __restrict__ p0 = ptr[q];
    const float a0 = coef[q];
    for (int64_t c = 0; c < n; ++c) yr[c] += a0 * Widen(p0[c]);
  }
}

template <typename W>
void RunItems(OutJob<W>& jb) {
  std::vector<const W*> ptr(jb.k * jb.bs);
  std::vector<float> coef(jb.k * jb.bs);
  for (;;) {
    const int64_t i = jb.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= jb.n_items) return;
    Item(jb, i, ptr, coef);
    jb.done.fetch_add(1, std::memory_order_release);
  }
}

template <ffi::DataType T>
ffi::Error RowsProduct(ffi::ThreadPool pool, ffi::Buffer<T> weight, ffi::Buffer<ffi::S32> idx,
                       ffi::Buffer<ffi::F32> h, ffi::ResultBuffer<ffi::F32> y) {
  auto wd = weight.dimensions(), id = idx.dimensions(), hd = h.dimensions(),
       yd = y->dimensions();
  if (wd.size() != 3 || id.size() != 2 || hd.size() != 3 || yd.size() != 2 || hd[0] != id[0] ||
      hd[1] != id[1] || hd[2] != wd[1] || yd[0] != id[0] || yd[1] != wd[2]) {
    return ffi::Error::InvalidArgument("lrcc_ffn_rows_product: inconsistent shapes");
  }
  using W = ffi::NativeType<T>;
  const int64_t rows = id[0], d_out = wd[2];
  if (rows == 0 || d_out == 0) return ffi::Error::Success();
  if (wd[0] == 0 || id[1] == 0 || wd[1] == 0) {
    std::fill(y->typed_data(), y->typed_data() + rows * d_out, 0.0f);
    return ffi::Error::Success();
  }
  auto jb = std::make_shared<OutJob<W>>();
  jb->w = weight.typed_data();
  jb->idx = idx.typed_data();
  jb->h = h.typed_data();
  jb->y = y->typed_data();
  jb->n_blocks = wd[0];
  jb->bs = wd[1];
  jb->d_out = d_out;
  jb->k = id[1];
  const int64_t work = rows * jb->k * jb->bs * d_out;
  const int64_t threads =
      work < kMinParallelWork ? 1 : std::max<int64_t>(1, pool.num_threads());
  // Enough column chunks per row that all threads get a few items.
  const int64_t want = std::max<int64_t>(1, (4 * threads + rows - 1) / rows);
  int64_t chunk = (d_out + want - 1) / want;
  chunk = std::max(kMinChunkCols, (chunk + 15) / 16 * 16);
  jb->chunk = std::min(chunk, d_out);
  jb->col_chunks = (d_out + jb->chunk - 1) / jb->chunk;
  jb->n_items = rows * jb->col_chunks;
  // As in tile_product.cc: helpers and the caller pull items from one counter; the caller
  // then waits only for items already claimed, so nothing waits on a queued task.
  for (int64_t t = 1; t < threads && t < jb->n_items; ++t) pool.Schedule([jb] { RunItems(*jb); });
  RunItems(*jb);
  while (jb->done.load(std::memory_order_acquire) < jb->n_items) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LrccFfnRowsProduct, RowsProduct<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LrccFfnRowsProductBf16, RowsProduct<ffi::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
