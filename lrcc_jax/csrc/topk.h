// Top-k selection on order-preserving integer keys, shared by select.cc (the dense
// fallback's epilogue) and fused_layer.cc (one conditional layer per call).
//
// A score's key orders as the score does, NaN as +inf and -0 below +0. The k-th highest
// key is found by bisection, bit by bit from the top, for the largest candidate with at
// least k keys at or above it; it stops as soon as exactly k are (then they are the top k
// and no tie straddles the boundary). The keys' high halves are bisected first, 32 to an
// AVX-512 register, then the low halves of the few keys that share the k-th one's high
// half. On 1024 random scores half the rows stop in the first stage and the others keep
// about three keys: 25% less time than 32-bit steps over all keys. fused_layer.cc had
// used std::nth_element (branchy, and it moves the keys): a third of its time at 64 rows.

#ifndef LRCC_JAX_CSRC_TOPK_H_
#define LRCC_JAX_CSRC_TOPK_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace lrcc_topk {

// Unsigned order of the key = float order of the score, NaN ranked as +inf. Branch-free
// (random signs would mispredict): negative floats flip every bit, others the sign bit.
inline uint32_t OrderKey(float s) {
  s = s != s ? INFINITY : s;
  uint32_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  const uint32_t negative = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31);
  return bits ^ (negative | 0x80000000u);
}

// Number of 16-bit keys at or above `cand`: a branch-free loop the compiler vectorises, 32
// keys to an AVX-512 register, in 16-bit counts over runs too short to overflow them.
inline int64_t CountAtLeast16(const uint16_t* __restrict keys, int64_t n, uint16_t cand) {
  int64_t total = 0;
  for (int64_t b0 = 0; b0 < n; b0 += 32768) {
    const int64_t b1 = std::min(n, b0 + 32768);
    uint16_t count = 0;
    for (int64_t b = b0; b < b1; ++b) count += keys[b] >= cand ? 1 : 0;
    total += count;
  }
  return total;
}

// Full keys and their high halves.
inline void Keys(const float* __restrict s, int64_t nb, uint32_t* __restrict keys,
                 uint16_t* __restrict high) {
  for (int64_t b = 0; b < nb; ++b) {
    keys[b] = OrderKey(s[b]);
    high[b] = static_cast<uint16_t>(keys[b] >> 16);
  }
}

// The low halves of the keys whose high half is `hi` (few, in a row of random scores),
// into `low`; returns how many. 32 high halves per compare, and a scalar pass only over
// the vectors that hold a match.
inline int64_t LowHalvesOf(const uint32_t* __restrict keys, const uint16_t* __restrict high,
                           int64_t nb, uint16_t hi, uint16_t* __restrict low) {
  typedef uint16_t U16x32 __attribute__((vector_size(64)));
  U16x32 want;
  for (int j = 0; j < 32; ++j) want[j] = hi;
  int64_t n = 0, b = 0;
  for (; b + 32 <= nb; b += 32) {
    U16x32 h;
    std::memcpy(&h, high + b, sizeof h);
    const auto eq = h == want;
    uint64_t lanes[8], any = 0;
    std::memcpy(lanes, &eq, sizeof lanes);
    for (const uint64_t l : lanes) any |= l;
    if (any == 0) continue;
    for (int64_t j = b; j < b + 32; ++j) {
      if (high[j] == hi) low[n++] = static_cast<uint16_t>(keys[j]);
    }
  }
  for (; b < nb; ++b) {
    if (high[b] == hi) low[n++] = static_cast<uint16_t>(keys[b]);
  }
  return n;
}

// The k-th highest of the nb keys `kp` (their high halves in `high`), and whether exactly k
// keys are at or above it; `low` is scratch for up to nb halves. Needs 1 <= k <= nb.
inline std::pair<uint32_t, bool> KthKey(const uint32_t* kp, const uint16_t* high, int64_t nb,
                                        int64_t k, uint16_t* low) {
  uint32_t hi = 0;
  for (int bit = 15; bit >= 0; --bit) {
    const uint32_t cand = hi | (1u << bit);
    const int64_t count = CountAtLeast16(high, nb, static_cast<uint16_t>(cand));
    if (count >= k) {
      hi = cand;
      if (count == k) return {hi << 16, true};
    }
  }
  // Fewer than k keys have a higher high half; the rest of the top k share hi.
  const int64_t above =
    hi == 0xFFFFu ? 0 : CountAtLeast16(high, nb, static_cast<uint16_t>(hi + 1));
  const int64_t n_low = LowHalvesOf(kp, high, nb, static_cast<uint16_t>(hi), low);
  const int64_t need = k - above;  // >= 1, and <= n_low
  uint32_t lo = 0;
  int64_t at_least = n_low;
  for (int bit = 15; bit >= 0; --bit) {
    const uint32_t cand = lo | (1u << bit);
    const int64_t count = CountAtLeast16(low, n_low, static_cast<uint16_t>(cand));
    if (count >= need) {
      lo = cand;
      at_least = count;
      if (count == need) break;
    }
  }
  return {(hi << 16) | lo, at_least == need};
}

// Calls take(b), in ascending b, for each of the k highest of the nb keys given the k-th
// highest, kth (KthKey): every key above kth, then keys equal to it from the lowest index
// until there are k (lax.top_k's tie order).
template <class Take>
inline void ForEachTopK(const uint32_t* keys, int64_t nb, int64_t k, uint32_t kth, Take&& take) {
  int64_t above = 0;
  for (int64_t b = 0; b < nb; ++b) above += keys[b] > kth;
  int64_t ties = k - above, n = 0;
  for (int64_t b = 0; b < nb && n < k; ++b) {
    if (keys[b] > kth || (keys[b] == kth && ties-- > 0)) {
      take(b);
      ++n;
    }
  }
}

// Scratch of one thread for TopKIndices, for rows of up to nb scores.
struct TopKBuffers {
  std::vector<uint32_t> keys;
  std::vector<uint16_t> high, low;
  explicit TopKBuffers(int64_t nb) : keys(nb), high(nb), low(nb) {}
};

// out[0:k] = the indices of the k highest of the nb scores `s`, ascending (NaN first, ties
// to the lower index): every index when k >= nb, else KthKey and one ForEachTopK scan.
inline void TopKIndices(const float* s, int64_t nb, int64_t k, int32_t* out, TopKBuffers& buf) {
  if (k >= nb) {
    for (int64_t b = 0; b < k; ++b) out[b] = static_cast<int32_t>(b);
    return;
  }
  Keys(s, nb, buf.keys.data(), buf.high.data());
  const uint32_t kth = KthKey(buf.keys.data(), buf.high.data(), nb, k, buf.low.data()).first;
  int64_t n = 0;
  ForEachTopK(buf.keys.data(), nb, k, kth, [&](int64_t b) { out[n++] = static_cast<int32_t>(b); });
}

}  // namespace lrcc_topk

#endif  // LRCC_JAX_CSRC_TOPK_H_
