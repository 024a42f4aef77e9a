// The dense fallback's epilogue on XLA:CPU in one pass (see lrcc_jax/_packed.py, `dense_epilogue`).
//
//   y[r, b * bs + j] = M[r, b] ? relu(z[r, b * bs + j] + bias[b * bs + j]) : 0
//
// z is the dense product (rows, n_out), scores the block scores (rows, n_blocks) of the
// estimate and M the contract's mask (docs/design.md, "The mask"): block b passes when
// !(scores[r, b] <= threshold) (NaN passes) and, with a capacity k < n_blocks, when it is
// also among the row's k highest scores, NaN ranked as +inf and ties going to the lower
// index (lax.top_k's choice). The k-th highest score is found by the bisection of
// `_mask.top_k_membership` on the same order-preserving integer keys, in vectorised
// counting loops that stop as soon as exactly k keys lie above the candidate; it runs only
// when more than k blocks pass the threshold. The bias, ReLU and mask are applied while z
// is read once. Rows are split over the XLA:CPU thread pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Unsigned order of the key = float order of the score, NaN ranked as +inf. Branch-free
// (random signs would mispredict): negative floats flip every bit, others the sign bit.
inline uint32_t OrderKey(float s) {
  s = s != s ? INFINITY : s;
  uint32_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  const uint32_t negative = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31);
  return bits ^ (negative | 0x80000000u);
}

// relu(v) with NaN kept, or 0 where not kept; a select, so the loops below vectorise.
inline float KeptRelu(bool kept, float v) { return (kept && (v > 0.0f || v != v)) ? v : 0.0f; }

struct Job {
  const float* z;
  const float* scores;
  const float* bias;
  float threshold;
  float* y;
  int64_t rows, n_blocks, bs, capacity, chunk, n_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Number of keys at or above `cand`; a branch-free loop the compiler vectorises (32-bit
// counts: twice the lanes of 64-bit ones, and n_blocks < 2^31).
inline int64_t CountAtLeast(const uint32_t* __restrict keys, int64_t n, uint32_t cand) {
  uint32_t count = 0;
  for (int64_t b = 0; b < n; ++b) count += keys[b] >= cand ? 1u : 0u;
  return count;
}

void Row(const Job& jb, int64_t r, std::vector<uint32_t>& keys, std::vector<uint8_t>& keep) {
  const int64_t nb = jb.n_blocks, bs = jb.bs, n = nb * bs;
  const float* s = jb.scores + r * nb;
  const float* z = jb.z + r * n;
  float* y = jb.y + r * n;
  const float t = jb.threshold;
  int64_t passing = 0;
  for (int64_t b = 0; b < nb; ++b) {
    keep[b] = !(s[b] <= t);
    passing += keep[b];
  }
  // The capacity binds only when more than k blocks pass; then the k highest scores all
  // pass (passing keys order above the others), so only the rank among all keys matters.
  const int64_t k = jb.capacity;
  if (k > 0 && k < passing) {
    uint32_t* kp = keys.data();
    for (int64_t b = 0; b < nb; ++b) kp[b] = OrderKey(s[b]);  // vectorised
    // Bisection for the k-th highest key, bit by bit from the top: the largest `kth` with
    // at least k keys at or above it. When exactly k keys are at or above a candidate,
    // they are the top k and no tie straddles the boundary: stop there.
    uint32_t kth = 0;
    bool exact = false;
    for (int bit = 31; bit >= 0 && !exact; --bit) {
      const uint32_t cand = kth | (1u << bit);
      const int64_t count = CountAtLeast(kp, nb, cand);
      if (count >= k) {
        kth = cand;
        exact = count == k;
      }
    }
    if (exact) {
      for (int64_t b = 0; b < nb; ++b) keep[b] = keep[b] & (kp[b] >= kth);
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
    const uint8_t* kp = keep.data();
    for (int64_t j = 0; j < n; ++j) y[j] = KeptRelu(kp[j], z[j] + bias[j]);
  } else {
    for (int64_t b = 0; b < nb; ++b) {
      const bool kept = keep[b];
      for (int64_t j = b * bs; j < (b + 1) * bs; ++j) y[j] = KeptRelu(kept, z[j] + bias[j]);
    }
  }
}

void RunChunks(Job& jb) {
  std::vector<uint32_t> keys(jb.n_blocks);
  std::vector<uint8_t> keep(jb.n_blocks);
  for (;;) {
    const int64_t c = jb.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= jb.n_chunks) return;
    const int64_t end = std::min(jb.rows, (c + 1) * jb.chunk);
    for (int64_t r = c * jb.chunk; r < end; ++r) Row(jb, r, keys, keep);
    jb.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error MaskedRelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> scores,
                      ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> threshold,
                      ffi::ResultBuffer<ffi::F32> y, int64_t capacity) {
  auto zd = z.dimensions(), sd = scores.dimensions(), bd = bias.dimensions();
  if (zd.size() != 2 || sd.size() != 2 || bd.size() != 1 || sd[0] != zd[0] || sd[1] < 1 ||
      zd[1] % sd[1] != 0 || bd[0] != zd[1] || threshold.element_count() != 1 || capacity < 0) {
    return ffi::Error::InvalidArgument("lrcc_masked_relu: inconsistent shapes");
  }
  auto jb = std::make_shared<Job>();
  jb->z = z.typed_data();
  jb->scores = scores.typed_data();
  jb->bias = bias.typed_data();
  jb->threshold = threshold.typed_data()[0];
  jb->y = y->typed_data();
  jb->rows = zd[0];
  jb->n_blocks = sd[1];
  jb->bs = zd[1] / sd[1];
  jb->capacity = capacity;
  if (jb->rows == 0) return ffi::Error::Success();
  // Chunks of at least 64k outputs: below that a second thread costs more than it saves.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t min_rows = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, zd[1]));
  jb->chunk = std::max(min_rows, (jb->rows + 2 * threads - 1) / (2 * threads));
  jb->n_chunks = (jb->rows + jb->chunk - 1) / jb->chunk;
  // As in tile_product.cc: helpers and the caller pull chunks from one counter, and the
  // caller waits only for chunks already claimed.
  for (int64_t t = 1; t < threads && t < jb->n_chunks; ++t) pool.Schedule([jb] { RunChunks(*jb); });
  RunChunks(*jb);
  while (jb->done.load(std::memory_order_acquire) < jb->n_chunks) std::this_thread::yield();
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
