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
// units, NaN if any unit is NaN), eight rows at a time in register-blocked products
// (estimate.h), right before the rows' epilogue. At 64-128 rows of a 1024-wide layer
// (rank 64) XLA ran the two thin products at about half the rate of the dense one and
// wrote the scores out and read them back: this replaces five XLA ops and two passes over
// memory with one call.
//
// lrcc_top_blocks is the selection alone, for the gather paths: idx[r, :] = the k highest
// of scores[r, :] in ascending order (`_mask.top_blocks`: NaN first, ties to the lower
// index), by the same bisection and one ascending scan (topk.h). XLA:CPU's top_k sorts:
// 40 us for one row of 1024 scores, 0.4 ms for one of 8192 or for 64 rows of 256.

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

#include "estimate.h"
#include "topk.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using lrcc_estimate::Load16;
using lrcc_estimate::Store16;
using lrcc_estimate::V16;
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
  // The estimated variant (est.x set): `scores` are computed by est (estimate.h) first.
  lrcc_estimate::Estimator est{};
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
  lrcc_topk::TopKBuffers topk;
  std::vector<uint8_t> keep;
  explicit RowBuffers(int64_t nb) : topk(nb), keep(nb) {}
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
    uint32_t* kp = buf.topk.keys.data();
    Keys(s, nb, kp, buf.topk.high.data());
    const auto [kth, exact] = KthKey(kp, buf.topk.high.data(), nb, k, buf.topk.low.data());
    if (exact) {
      KeepAtLeast(kp, nb, kth, keep);
    } else {  // ties at kth: the top k (all passing) are kept, the lower-indexed ties first
      std::memset(keep, 0, nb);
      lrcc_topk::ForEachTopK(kp, nb, k, kth, [keep](int64_t b) { keep[b] = 1; });
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


// Claims chunks of jb's rows from its counter until none is left, calling body(begin, end)
// for each; counts each finished chunk in jb.done (Launch waits on it).
template <typename J, typename Body>
void PullChunks(J& jb, Body&& body) {
  for (;;) {
    const int64_t c = jb.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= jb.n_chunks) return;
    body(c * jb.chunk, std::min(jb.rows, (c + 1) * jb.chunk));
    jb.done.fetch_add(1, std::memory_order_release);
  }
}

void RunChunks(Job& jb) {
  RowBuffers buf(jb.n_blocks);
  std::vector<float> t, z;
  if (jb.est.x != nullptr) {
    t.assign(8 * jb.est.rp, 0.f);
    z.assign(8 * jb.n_blocks * jb.bs, 0.f);
  }
  PullChunks(jb, [&](int64_t begin, int64_t end) {
    if (jb.est.x != nullptr) {  // the scores of these rows, eight at a time
      lrcc_estimate::EstimateRows(jb.est, begin, end, t.data(), z.data());
    }
    for (int64_t r = begin; r < end; ++r) Row(jb, r, buf);
  });
}

// lrcc_top_blocks' rows: the k highest of n_blocks scores each, ascending.
struct TopJob {
  const float* scores;
  int32_t* idx;
  int64_t rows, n_blocks, k, chunk, n_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void RunChunks(TopJob& jb) {
  const int64_t nb = jb.n_blocks, k = jb.k;
  lrcc_topk::TopKBuffers buf(nb);
  PullChunks(jb, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      lrcc_topk::TopKIndices(jb.scores + r * nb, nb, k, jb.idx + r * k, buf);
    }
  });
}

// Splits jb's rows into chunks of at least `min_rows` (a multiple of `multiple`) and runs
// them on the caller and XLA:CPU's pool: helpers and the caller pull chunks from one
// counter (as in tile_product.cc), and the caller waits only for chunks already claimed.
template <typename J>
void Launch(ffi::ThreadPool& pool, std::shared_ptr<J> jb, int64_t min_rows, int64_t multiple) {
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
  const float* up = lrcc_estimate::PaddedU(u.typed_data(), n_in, r, rp, padded);  // whole vectors
  jb->est = {x.typed_data(), n_in, up, rp, r, v.typed_data(), jb->bias, jb->n_blocks, jb->bs,
             scores.data()};
  jb->scores = scores.data();
  // A row costs its epilogue (n_out) and about r (n_in + n_out) / 16 vector multiply-adds;
  // chunks of at least 64k of those, in whole groups of eight rows.
  const int64_t per_row = zd[1] + r * (n_in + zd[1]) / 16;
  // (Splitting a few rows' estimate by columns instead ran 1.0-1.2x slower at 2-4 rows of
  // 1024-4096: the extra wake-ups cost more than the second core saved.)
  Launch(pool, jb, std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, per_row)), 8);
  return ffi::Error::Success();
}

ffi::Error TopBlocks(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scores,
                     ffi::ResultBuffer<ffi::S32> idx) {
  auto sd = scores.dimensions(), id = idx->dimensions();
  bool ok = sd.size() >= 1 && sd.size() == id.size() && sd.back() >= 1 && id.back() >= 1 &&
            id.back() <= sd.back();
  for (size_t i = 0; ok && i + 1 < sd.size(); ++i) ok = sd[i] == id[i];
  if (!ok) return ffi::Error::InvalidArgument("lrcc_top_blocks: inconsistent shapes");
  auto jb = std::make_shared<TopJob>();
  jb->scores = scores.typed_data();
  jb->idx = idx->typed_data();
  jb->n_blocks = sd.back();
  jb->k = id.back();
  jb->rows = scores.element_count() / jb->n_blocks;
  if (jb->rows == 0) return ffi::Error::Success();
  // Chunks of at least 16k scores: below that a second thread costs more than it saves.
  Launch(pool, jb, std::max<int64_t>(1, (16 * 1024) / jb->n_blocks), 1);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LrccTopBlocks, TopBlocks,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

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
