// The estimate's block scores for groups of eight dense rows, shared by select.cc (the dense
// fallback's epilogue) and fused_layer.cc (one conditional layer per call, from 8 rows on).
//
//   t = x U,  zhat = t V + bias,  score[b] = max over block b's units of zhat (NaN if any is)
//
// Both products are register-blocked: each load of U or V feeds eight rows, in sixteen
// vector accumulators (eight rows x 32 columns). U comes padded to rp columns, a multiple
// of 16 (the padding zero), so every load is a whole vector; V is (r, n_out).

#ifndef LRCC_JAX_CSRC_ESTIMATE_H_
#define LRCC_JAX_CSRC_ESTIMATE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace lrcc_estimate {

// 16 floats: one AVX-512 register (two AVX2 ones) through the GCC/Clang vector extension.
typedef float V16 __attribute__((vector_size(64)));
inline V16 Load16(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store16(float* p, V16 v) { std::memcpy(p, &v, sizeof v); }

// U (n_in, r) with its columns padded to rp = r rounded up to 16: U itself when r already
// is a multiple of 16, else a zero-padded copy held in `storage`.
inline const float* PaddedU(const float* u, int64_t n_in, int64_t r, int64_t rp,
                            std::vector<float>& storage) {
  if (rp == r) return u;
  storage.assign(n_in * rp, 0.f);
  for (int64_t i = 0; i < n_in; ++i) std::memcpy(&storage[i * rp], u + i * r, r * sizeof(float));
  return storage.data();
}

struct Estimator {
  const float* x;  // (rows, n_in)
  int64_t n_in;
  const float* u;  // (n_in, rp), zero past column r
  int64_t rp, r;
  const float* v;  // (r, n_out)
  const float* bias;  // (n_out,)
  int64_t n_blocks, bs;
  float* scores;  // (rows, n_blocks), written
};

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
void TimesU(const Estimator& e, int64_t r0, float* t) {
  const float* x = e.x + r0 * e.n_in;
  for (int64_t c0 = 0; c0 < e.rp; c0 += 32) {
    if (e.rp - c0 >= 32) {
      RowsTimesCols<R, 2>(x, e.n_in, e.n_in, e.u, e.rp, c0, t, e.rp);
    } else {
      RowsTimesCols<R, 1>(x, e.n_in, e.n_in, e.u, e.rp, c0, t, e.rp);
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

// out[b] = max over block b's units of z + bias (NaN if any is), for nb blocks of bs units:
// zhat itself for single units, BlockMax16 for multiples of 16, a scalar loop otherwise.
inline void BlockScores(const float* z, const float* bias, int64_t nb, int64_t bs, float* out) {
  if (bs == 1) {  // a unit is its block: the score is zhat itself (NaN included)
    for (int64_t b = 0; b < nb; ++b) out[b] = z[b] + bias[b];
  } else if (bs % 16 == 0) {
    for (int64_t b = 0; b < nb; ++b) out[b] = BlockMax16(z + b * bs, bias + b * bs, bs);
  } else {
    for (int64_t b = 0; b < nb; ++b) {
      float best = -INFINITY;
      bool nan = false;
      for (int64_t u = b * bs; u < (b + 1) * bs; ++u) {
        const float z_u = z[u] + bias[u];
        nan |= z_u != z_u;
        best = std::max(best, z_u);
      }
      out[b] = nan ? NAN : best;
    }
  }
}

// Block scores of rows [r0, r0 + R) from their t (R x rp):
// zhat = t V + bias (into z, R x n_out), then each block's max
// (NaN if any unit is NaN).
template <int R>
void Scores(const Estimator& e, int64_t r0, const float* t, float* z) {
  const int64_t rp = e.rp, r = e.r, nb = e.n_blocks, bs = e.bs, n_out = nb * bs;
  int64_t j = 0;
  for (; j + 32 <= n_out; j += 32) RowsTimesCols<R, 2>(t, rp, r, e.v, n_out, j, z, n_out);
  for (; j + 16 <= n_out; j += 16) RowsTimesCols<R, 1>(t, rp, r, e.v, n_out, j, z, n_out);
  for (; j < n_out; ++j) {
    for (int s = 0; s < R; ++s) {
      float acc = 0.f;
      for (int64_t q = 0; q < r; ++q) acc += t[s * rp + q] * e.v[q * n_out + j];
      z[s * n_out + j] = acc;
    }
  }
  for (int s = 0; s < R; ++s) BlockScores(z + s * n_out, e.bias, nb, bs, e.scores + (r0 + s) * nb);
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

// The scores of rows [begin, end), eight rows at a time; t and z are scratch of 8 rp and
// 8 n_out floats.
inline void EstimateRows(const Estimator& e, int64_t begin, int64_t end, float* t, float* z) {
  RowGroups(begin, end, [&](auto rows, int64_t r0) {
    constexpr int R = decltype(rows)::value;
    TimesU<R>(e, r0, t);
    Scores<R>(e, r0, t, z);
  });
}

}  // namespace lrcc_estimate

#endif  // LRCC_JAX_CSRC_ESTIMATE_H_
