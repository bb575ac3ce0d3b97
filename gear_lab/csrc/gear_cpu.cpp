// Compiled CPU path of block-wise GEAR (Kang et al. 2024): X_hat = D + L + S per [n, d] matrix.
//
// Built once with the system C++ compiler by gear_lab/native.py (one library with attention.cpp)
// and called through ctypes by gear_lab/compression/cpu_kernel.py. Every function works on M
// independent [n, d] matrices (the blocks of [batch, kv_heads, seq, head_dim]), one OpenMP task
// per matrix, and reproduces the torch reference of gear_lab.compression bit for bit where it can:
//   * outliers: torch.topk(sorted=False) on CPU, i.e. std::partial_sort when k * 64 <= length,
//     std::nth_element otherwise, on (value, index) pairs; tie-free vectors take a one-pass scan
//     that yields the same order, and k <= 2 replays partial_sort's heap in one scan;
//   * quantization: float32 min / max per group without outliers, zero rounded down and scale up
//     to float16, codes round-half-even((x - zero) * (1 / scale)) clamped, packed little endian;
//   * low rank: seeded subspace iteration with Householder QR (LAPACK's sign convention), left
//     Q [n, r] and right Q^T R [r, d], either in float32 or balanced and rounded to the kept
//     float16 / bfloat16 factors (equal to the reference within the iteration's tolerance).
// A matrix holding NaN / Inf is flagged and skipped (the caller hands the call to the reference,
// which raises): the input needs no separate check.
// Compile with -ffp-contract=off: the quantization must not fuse multiply and add.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "vec16.h"

namespace {

enum DType : int32_t { F16 = 0, BF16 = 1, F32 = 2 };

// Allocates whole 64-byte lines: the vector loops then never split a load across two lines
// (malloc's 16-byte alignment made their speed depend on where the heap put the buffers).
template <typename T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(std::size_t count) {
    return static_cast<T*>(::operator new(count * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const LineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAllocator<U>&) const { return false; }
};

template <typename T>
using Buffer = std::vector<T, LineAllocator<T>>;

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round half to even (finite input)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline uint16_t half_bits(_Float16 h) {
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

inline _Float16 bits_half(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return h;
}

// float16 bits -> float for count entries (vector conversions where the CPU has them).
void halves_to_floats(const uint16_t* src, float* out, int64_t count) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= count; i += 16)
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(src + i))));
#elif defined(__F16C__)
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < count; ++i) out[i] = static_cast<float>(bits_half(src[i]));
}

// float -> float16 bits, rounding half to even, for count entries.
void floats_to_halves(const float* src, uint16_t* out, int64_t count) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= count; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  for (; i + 8 <= count; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < count; ++i) out[i] = half_bits(static_cast<_Float16>(src[i]));
}

// Round value[0..count) to float16 towards -inf (down) or +inf (up), like quantize.to_half:
// bits to out, their float values to back (not aliasing value).
void round_outward(const float* value, uint16_t* out, float* back, int64_t count, bool up) {
  floats_to_halves(value, out, count);
  halves_to_floats(out, back, count);
#pragma omp simd
  for (int64_t s = 0; s < count; ++s) {
    const uint16_t b = out[s];
    const bool wrong = up ? back[s] < value[s] : back[s] > value[s];
    const bool zero = (b & 0x7fff) == 0, negative = b & 0x8000;
    // one step towards the direction: from a zero to the smallest subnormal of that sign
    const uint16_t step = zero ? uint16_t(up ? 0x0001 : 0x8001)
                               : uint16_t(negative == up ? b - 1 : b + 1);
    out[s] = wrong ? step : b;
  }
  halves_to_floats(out, back, count);
}

// Loads count entries as float32 into out; returns 1 where one of them is NaN or infinite (its
// exponent field all ones).
int32_t load_matrix(const void* src, int32_t dtype, int64_t count, float* out) {
  if (dtype == F32) {
    const uint32_t* p = static_cast<const uint32_t*>(src);
    uint32_t most = 0;
#pragma omp simd reduction(max : most)
    for (int64_t i = 0; i < count; ++i) most = std::max(most, p[i] & 0x7f800000u);
    std::memcpy(out, src, count * sizeof(float));
    return most == 0x7f800000u;
  }
  const uint16_t* p = static_cast<const uint16_t*>(src);
  const uint16_t exponent = dtype == F16 ? 0x7c00 : 0x7f80;
  uint16_t most = 0;
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  if (dtype == F16) {  // one pass: converted and checked as the halves are read
    __m256i top = _mm256_setzero_si256();
    const __m256i field = _mm256_set1_epi16(0x7c00);
    for (; i + 16 <= count; i += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
      top = _mm256_max_epu16(top, _mm256_and_si256(h, field));
      _mm512_storeu_ps(out + i, _mm512_cvtph_ps(h));
    }
    const __m128i half =
        _mm_max_epu16(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
    // the largest of 8 unsigned words: minpos of their complements
    most = uint16_t(~_mm_cvtsi128_si32(_mm_minpos_epu16(_mm_xor_si128(half, _mm_set1_epi16(-1)))));
  }
#endif
#pragma omp simd reduction(max : most)
  for (int64_t j = i; j < count; ++j) most = std::max<uint16_t>(most, p[j] & exponent);
  if (dtype == F16) {
    halves_to_floats(p + i, out + i, count - i);
  } else {
    for (int64_t j = 0; j < count; ++j) out[j] = bf16_to_float(p[j]);
  }
  return most == exponent;
}

inline int64_t element_size(int32_t dtype) { return dtype == F32 ? 4 : 2; }

// Element offset of matrix m of a body whose leading dims have the given sizes / strides.
int64_t matrix_offset(int64_t m, int32_t ndim, const int64_t* sizes, const int64_t* strides) {
  int64_t offset = 0;
  for (int32_t i = ndim - 1; i >= 0; --i) {
    offset += (m % sizes[i]) * strides[i];
    m /= sizes[i];
  }
  return offset;
}

void store_index(void* dst, int32_t index_bytes, int64_t i, int32_t value) {
  if (index_bytes == 1) static_cast<uint8_t*>(dst)[i] = uint8_t(value);
  else if (index_bytes == 2) static_cast<int16_t*>(dst)[i] = int16_t(value);
  else static_cast<int32_t*>(dst)[i] = value;
}

int32_t load_index(const void* src, int32_t index_bytes, int64_t i) {
  if (index_bytes == 1) return static_cast<const uint8_t*>(src)[i];
  if (index_bytes == 2) return static_cast<const int16_t*>(src)[i];
  return static_cast<const int32_t*>(src)[i];
}

// ---------------------------------------------------------------------------------- outliers

using Pair = std::pair<float, int64_t>;

// std::partial_sort's picks for k = 1 or 2 (libstdc++'s __heap_select, then __sort_heap) in
// one scan of key, ties included: the heap holds t (its top, the worse) and u; an entry better
// than t replaces it and sifts down (k = 1: the first best entry).
template <typename Better>
void heap_top(const float* key, int64_t len, int64_t k, Better better, int32_t* out) {
  int32_t t = 0, u = 0;
  if (k == 2) {
    if (better(key[1], key[0])) u = 1;
    else t = 1;
  }
  for (int32_t i = int32_t(k); i < len; ++i) {
    if (!better(key[i], key[t])) continue;
    if (k == 2 && !better(key[u], key[i])) t = std::exchange(u, i);
    else t = i;
  }
  out[0] = k == 2 ? u : t;
  if (k == 2) out[1] = t;
}

// The k entries of key[0..len) that torch.topk(k, largest, sorted=False) returns, in its order.
void topk(const float* key, int64_t len, int64_t k, bool largest, int32_t* out,
          std::vector<Pair>& queue) {
  if (k <= 0) return;
  if (k <= 2 && k * 64 <= len) {
    if (largest) heap_top(key, len, k, [](float a, float b) { return a > b; }, out);
    else heap_top(key, len, k, [](float a, float b) { return a < b; }, out);
    return;
  }
  queue.resize(len);
  for (int64_t i = 0; i < len; ++i) queue[i] = Pair(key[i], i);
  auto greater = [](const Pair& a, const Pair& b) { return a.first > b.first; };
  auto less = [](const Pair& a, const Pair& b) { return a.first < b.first; };
  if (k * 64 <= len) {
    if (largest) std::partial_sort(queue.begin(), queue.begin() + k, queue.end(), greater);
    else std::partial_sort(queue.begin(), queue.begin() + k, queue.end(), less);
  } else {
    if (largest) std::nth_element(queue.begin(), queue.begin() + k - 1, queue.end(), greater);
    else std::nth_element(queue.begin(), queue.begin() + k - 1, queue.end(), less);
  }
  for (int64_t i = 0; i < k; ++i) out[i] = int32_t(queue[i].second);
}

// Inserts (v, i) into the sorted best[0..kept) (at most want entries) when it beats the last.
template <bool Largest>
inline void keep_best(float v, int32_t i, float* best, int32_t* where, int32_t& kept,
                      int32_t want) {
  if (kept == want && !(Largest ? v > best[want - 1] : v < best[want - 1])) return;
  int32_t p = kept < want ? kept++ : want - 1;
  while (p > 0 && (Largest ? v > best[p - 1] : v < best[p - 1])) {
    best[p] = best[p - 1];
    where[p] = where[p - 1];
    --p;
  }
  best[p] = v;
  where[p] = i;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// select_chunks for a vector of 16 * C contiguous entries held in registers: the hi largest (of
// |x| for magnitude), then the lo smallest, each found as the unique entry equal to the best
// below (above) the previous one. False on a tie (then the sort's order decides).
template <int C>
bool select_chunks(const float* x, int32_t hi, int32_t lo, bool magnitude, int32_t* picked) {
  const float inf = std::numeric_limits<float>::infinity();
  __m512 v[C];
  for (int c = 0; c < C; ++c) {
    v[c] = _mm512_loadu_ps(x + 16 * c);
    if (magnitude) v[c] = _mm512_andnot_ps(_mm512_set1_ps(-0.0f), v[c]);
  }
  static_assert(C == 4 || C == 8, "64 or 128 entries: one or two 64-bit masks");
  // the unique position of value in v, or -1 (the C 16-bit masks joined into 64-bit words)
  auto unique = [&](float value) {
    const __m512 target = _mm512_set1_ps(value);
    __mmask16 hit[8];
    for (int c = 0; c < C; ++c) hit[c] = _mm512_cmp_ps_mask(v[c], target, _CMP_EQ_OQ);
    const uint64_t low = _cvtmask64_u64(
        _mm512_kunpackd(_mm512_kunpackw(hit[3], hit[2]), _mm512_kunpackw(hit[1], hit[0])));
    const uint64_t high = C == 4 ? 0 : _cvtmask64_u64(_mm512_kunpackd(
        _mm512_kunpackw(hit[C - 1], hit[C - 2]), _mm512_kunpackw(hit[C - 3], hit[C - 4])));
    const int32_t at = low ? __builtin_ctzll(low) : 64 + __builtin_ctzll(high);
    return __builtin_popcountll(low) + __builtin_popcountll(high) == 1 ? at : -1;
  };
  // lane-wise largest (first) and second largest (second) of v, as a tree: short chains
  __m512 first[C / 2], second[C / 2];
  for (int c = 0; c < C / 2; ++c) {
    first[c] = _mm512_max_ps(v[2 * c], v[2 * c + 1]);
    second[c] = _mm512_min_ps(v[2 * c], v[2 * c + 1]);
  }
  for (int w = C / 4; w >= 1; w /= 2)
    for (int c = 0; c < w; ++c) {
      second[c] = _mm512_max_ps(_mm512_min_ps(first[c], first[c + w]),
                                _mm512_max_ps(second[c], second[c + w]));
      first[c] = _mm512_max_ps(first[c], first[c + w]);
    }
  float bound = _mm512_reduce_max_ps(first[0]);
  for (int32_t j = 0; j < hi; ++j) {
    if (j == 1) {  // the largest lanes with the first pick's lane's second (a tie fails above)
      const __mmask16 lane = _mm512_cmp_ps_mask(first[0], _mm512_set1_ps(bound), _CMP_EQ_OQ);
      bound = _mm512_reduce_max_ps(_mm512_mask_blend_ps(lane, first[0], second[0]));
    } else if (j > 1) {
      __m512 most = _mm512_set1_ps(-inf);
      for (int c = 0; c < C; ++c)
        most = _mm512_mask_max_ps(
            most, _mm512_cmp_ps_mask(v[c], _mm512_set1_ps(bound), _CMP_LT_OQ), most, v[c]);
      bound = _mm512_reduce_max_ps(most);
    }
    if ((picked[j] = unique(bound)) < 0) return false;
  }
  bound = -inf;
  for (int32_t j = 0; j < lo; ++j) {
    __m512 least[C];
    for (int c = 0; c < C; ++c)
      least[c] = j ? _mm512_mask_blend_ps(
                         _mm512_cmp_ps_mask(v[c], _mm512_set1_ps(bound), _CMP_GT_OQ),
                         _mm512_set1_ps(inf), v[c])
                   : v[c];
    for (int w = C / 2; w >= 1; w /= 2)
      for (int c = 0; c < w; ++c) least[c] = _mm512_min_ps(least[c], least[c + w]);
    bound = _mm512_reduce_min_ps(least[0]);
    const int32_t at = unique(bound);
    for (int32_t t = 0; t < hi; ++t)
      if (picked[t] == at) return false;  // the reference would skip it (set to +inf)
    if ((picked[hi + j] = at) < 0) return false;
  }
  return true;
}

// select_chunks for entries that came from float16 / bfloat16 (their float32 mantissas end in at
// least 13 zero bits) and at most 2 largest and 1 smallest: each entry's position (< 16 * C
// <= 128) goes into those 7 low bits, so every key is distinct, carries its position, and
// keys of different values order as the values. The picks then come from lane-wise
// trees and one reduction each, with no search for where they are; a tie fails as in
// select_chunks, found by comparing the values of the next key on each side.
template <int C>
bool select_stashed(const float* x, int32_t hi, int32_t lo, bool magnitude, int32_t* picked) {
  static_assert(C == 4 || C == 8, "64 or 128 entries");
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 key[C];
  for (int c = 0; c < C; ++c) {
    __m512i bits = _mm512_loadu_si512(x + 16 * c);
    if (magnitude) bits = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
    key[c] = _mm512_castsi512_ps(
        _mm512_or_si512(bits, _mm512_add_epi32(lane, _mm512_set1_epi32(16 * c))));
  }
  auto bits_of = [](float k) {
    uint32_t b;
    std::memcpy(&b, &k, 4);
    return b;
  };
  auto value = [&](float k) {  // the entry's own value: the position bits cleared
    const uint32_t b = bits_of(k) & ~uint32_t(0x7f);
    float v;
    std::memcpy(&v, &b, 4);
    return v;
  };
  auto at = [&](float k) { return int32_t(bits_of(k) & 0x7f); };
  // lane-wise largest and second largest (smallest and second smallest), as trees
  __m512 first[C / 2], second[C / 2], least[C / 2], next[C / 2];
  for (int c = 0; c < C / 2; ++c) {
    first[c] = _mm512_max_ps(key[2 * c], key[2 * c + 1]);
    second[c] = _mm512_min_ps(key[2 * c], key[2 * c + 1]);
    least[c] = second[c];
    next[c] = first[c];
  }
  for (int w = C / 4; w >= 1; w /= 2)
    for (int c = 0; c < w; ++c) {
      second[c] = _mm512_max_ps(_mm512_min_ps(first[c], first[c + w]),
                                _mm512_max_ps(second[c], second[c + w]));
      first[c] = _mm512_max_ps(first[c], first[c + w]);
      next[c] = _mm512_min_ps(_mm512_max_ps(least[c], least[c + w]),
                              _mm512_min_ps(next[c], next[c + w]));
      least[c] = _mm512_min_ps(least[c], least[c + w]);
    }
  auto lane_of = [&](float k) { return __mmask16(1u << (at(k) & 15)); };
  if (hi) {
    const float t1 = _mm512_reduce_max_ps(first[0]);
    const float t2 = _mm512_reduce_max_ps(_mm512_mask_blend_ps(lane_of(t1), first[0], second[0]));
    picked[0] = at(t1);
    if (!(value(t2) < value(t1))) return false;
    if (hi == 2) {
      float t3;
      if (lane_of(t1) != lane_of(t2)) {
        t3 = _mm512_reduce_max_ps(
            _mm512_mask_blend_ps(lane_of(t1) | lane_of(t2), first[0], second[0]));
      } else {  // both from one lane, whose third is not kept: the largest key below t2
        __m512 most = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int c = 0; c < C; ++c)
          most = _mm512_mask_max_ps(
              most, _mm512_cmp_ps_mask(key[c], _mm512_set1_ps(t2), _CMP_LT_OQ), most, key[c]);
        t3 = _mm512_reduce_max_ps(most);
      }
      picked[1] = at(t2);
      if (!(value(t3) < value(t2))) return false;
    }
  }
  if (lo) {
    const float b1 = _mm512_reduce_min_ps(least[0]);
    const float b2 = _mm512_reduce_min_ps(_mm512_mask_blend_ps(lane_of(b1), least[0], next[0]));
    picked[hi] = at(b1);
    if (!(value(b1) < value(b2))) return false;
    for (int32_t j = 0; j < hi; ++j)
      if (picked[j] == picked[hi]) return false;  // the reference would skip it
  }
  return true;
}
#endif

// One pass for the common case (few outliers, partial_sort regime): the hi largest (of |x| for
// magnitude) and lo smallest entries, which is partial_sort's order when the best hi + 1 and
// lo + 1 are strictly ordered and the smallest do not reach the largest. False otherwise.
// stashed: the entries came from float16 / bfloat16 (select_stashed applies).
bool scan_vector(const float* x, int64_t stride, int64_t len, int32_t hi, int32_t lo,
                 bool magnitude, bool stashed, int32_t* picked) {
  if (hi > 8 || lo > 8 || hi * 64 > len || lo * 64 > len || hi + lo + 2 > len) return false;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (stashed && hi <= 2 && lo <= 1 && stride == 1) {
    if (len == 128) return select_stashed<8>(x, hi, lo, magnitude, picked);
    if (len == 64) return select_stashed<4>(x, hi, lo, magnitude, picked);
  }
  if (stride == 1 && len == 128) return select_chunks<8>(x, hi, lo, magnitude, picked);
  if (stride == 1 && len == 64) return select_chunks<4>(x, hi, lo, magnitude, picked);
#endif
  float top[9], bottom[9];
  int32_t top_at[9], bottom_at[9], tops = 0, bottoms = 0;
  const int32_t want_top = hi + 1, want_bottom = lo ? lo + 1 : 0;
  for (int64_t i = 0; i < len; ++i) {
    const float v = magnitude ? std::fabs(x[i * stride]) : x[i * stride];
    keep_best<true>(v, int32_t(i), top, top_at, tops, want_top);
    if (want_bottom) keep_best<false>(v, int32_t(i), bottom, bottom_at, bottoms, want_bottom);
  }
  // fewer kept than wanted: the next best was never visited, so it lies strictly beyond
  for (int32_t j = 1; j < tops; ++j)
    if (top[j - 1] == top[j]) return false;
  for (int32_t j = 1; j < bottoms; ++j)
    if (bottom[j - 1] == bottom[j]) return false;
  for (int32_t j = 0; j < bottoms; ++j)
    for (int32_t t = 0; t < hi; ++t)
      if (bottom_at[j] == top_at[t]) return false;
  for (int32_t j = 0; j < hi; ++j) picked[j] = top_at[j];
  for (int32_t j = 0; j < lo; ++j) picked[hi + j] = bottom_at[j];
  return true;
}

// Picks the outliers of one vector (len entries of x at stride) as outliers.extract_outliers;
// stashed as in scan_vector.
void pick_vector(const float* x, int64_t stride, int64_t len, int32_t hi, int32_t lo,
                 bool magnitude, bool stashed, int32_t* picked, std::vector<float>& key,
                 std::vector<Pair>& queue) {
  if (scan_vector(x, stride, len, hi, lo, magnitude, stashed, picked)) return;
  key.resize(len);
  for (int64_t i = 0; i < len; ++i) key[i] = magnitude ? std::fabs(x[i * stride]) : x[i * stride];
  topk(key.data(), len, hi, true, picked, queue);
  if (magnitude || lo == 0) return;
  for (int32_t j = 0; j < hi; ++j) key[picked[j]] = std::numeric_limits<float>::infinity();
  topk(key.data(), len, lo, false, picked + hi, queue);
}

// ----------------------------------------------------------------------------- bit packing

// A mask keeping the low `keep` bits of every `width`-bit lane of a 64-bit word.
constexpr uint64_t lanes(int width, int keep) {
  uint64_t mask = 0;
  for (int shift = 0; shift < 64; shift += width) mask |= ((uint64_t(1) << keep) - 1) << shift;
  return mask;
}

// Packs codes[0..count) (< 2**BITS each, count a multiple of 8) as quantize.pack_codes: every 8
// codes, read as one little-endian word, compacted in three shift-and-mask steps into BITS bytes.
template <int BITS>
void pack(const uint8_t* codes, uint8_t* out, int64_t count) {
  for (int64_t w = 0; w < count / 8; ++w) {
    uint64_t word;
    std::memcpy(&word, codes + 8 * w, 8);
    if (BITS < 8) {
      word = (word & lanes(16, BITS)) | ((word >> (8 - BITS)) & (lanes(16, BITS) << BITS));
      word = (word & lanes(32, 2 * BITS)) |
             ((word >> (16 - 2 * BITS)) & (lanes(32, 2 * BITS) << (2 * BITS)));
      word = (word & lanes(64, 4 * BITS)) |
             ((word >> (32 - 4 * BITS)) & (lanes(64, 4 * BITS) << (4 * BITS)));
    }
    if constexpr (BITS == 1 || BITS == 2 || BITS == 4 || BITS == 8) {
      using Word = std::conditional_t<BITS == 1, uint8_t, std::conditional_t<BITS == 2, uint16_t,
                   std::conditional_t<BITS == 4, uint32_t, uint64_t>>>;
      const Word low = Word(word);  // a whole-word store lets the loop vectorize
      std::memcpy(out + BITS * w, &low, BITS);
    } else {
      std::memcpy(out + BITS * w, &word, BITS);
    }
  }
}

// Inverse of pack: the codes of count entries, one byte each.
template <int BITS>
void unpack(const uint8_t* packed, uint8_t* codes, int64_t count) {
  for (int64_t w = 0; w < count / 8; ++w) {
    uint64_t word = 0;
    if constexpr (BITS == 1 || BITS == 2 || BITS == 4 || BITS == 8) {
      using Word = std::conditional_t<BITS == 1, uint8_t, std::conditional_t<BITS == 2, uint16_t,
                   std::conditional_t<BITS == 4, uint32_t, uint64_t>>>;
      Word low;
      std::memcpy(&low, packed + BITS * w, BITS);
      word = low;
    } else {
      std::memcpy(&word, packed + BITS * w, BITS);
    }
    if (BITS < 8) {
      word = (word & lanes(64, 4 * BITS)) |
             ((word & (lanes(64, 4 * BITS) << (4 * BITS))) << (32 - 4 * BITS));
      word = (word & lanes(32, 2 * BITS)) |
             ((word & (lanes(32, 2 * BITS) << (2 * BITS))) << (16 - 2 * BITS));
      word = (word & lanes(16, BITS)) | ((word & (lanes(16, BITS) << BITS)) << (8 - BITS));
    }
    std::memcpy(codes + 8 * w, &word, 8);
  }
}

template <template <int> class Op, typename... Args>
void by_bits(int bits, Args... args) {
  switch (bits) {
    case 1: return Op<1>::run(args...);
    case 2: return Op<2>::run(args...);
    case 3: return Op<3>::run(args...);
    case 4: return Op<4>::run(args...);
    case 5: return Op<5>::run(args...);
    case 6: return Op<6>::run(args...);
    case 7: return Op<7>::run(args...);
    default: return Op<8>::run(args...);
  }
}

template <int BITS>
struct Pack {
  static void run(const uint8_t* codes, uint8_t* out, int64_t count) {
    pack<BITS>(codes, out, count);
  }
};

template <int BITS>
struct Unpack {
  static void run(const uint8_t* packed, uint8_t* codes, int64_t count) {
    unpack<BITS>(packed, codes, count);
  }
};

// ---------------------------------------------------------------------------- quantization

#if defined(__AVX512BW__) && defined(__AVX512VL__)
// code_span on the 16 entries at row with zero z, scale s, inverse i: the same operations in the
// same order (vmaxps(0, v) and vminps(levels, v) are std::max(v, 0) and std::min(v, levels)),
// the skip bytes tested straight into a lane mask (code_span's loop widens them and runs 64
// entries wide with a remainder: slow on short spans).
inline void code16(const float* row, const uint8_t* skip, __m512 z, __m512 s, __m512 i,
                   __m512 levels, uint8_t* code, float* residual) {
  const __m512 x = _mm512_loadu_ps(row);
  __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(x, z), i),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm512_min_ps(levels, _mm512_max_ps(_mm512_setzero_ps(), v));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(code), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v)));
  const __m128i held = _mm_loadu_si128(reinterpret_cast<const __m128i*>(skip));
  _mm512_storeu_ps(residual, _mm512_maskz_sub_ps(_mm_testn_epi8_mask(held, held), x,
                                                 _mm512_add_ps(_mm512_mul_ps(v, s), z)));
}
#endif

// Codes of row[begin..end) with the zero / scale / inverse of each channel (PerChannel) or one
// for the span, and the residual row - (code * scale + zero), zero where skip is set.
template <bool PerChannel>
inline void code_span(const float* row, const uint8_t* skip, const float* zero,
                      const float* scale, const float* inverse, int64_t begin, int64_t end,
                      float levels, uint8_t* code, float* residual) {
  int64_t first = begin;
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  for (; first + 16 <= end; first += 16)
    code16(row + first, skip + first,
           PerChannel ? _mm512_loadu_ps(zero + first) : _mm512_set1_ps(zero[0]),
           PerChannel ? _mm512_loadu_ps(scale + first) : _mm512_set1_ps(scale[0]),
           PerChannel ? _mm512_loadu_ps(inverse + first) : _mm512_set1_ps(inverse[0]),
           _mm512_set1_ps(levels), code + first, residual + first);
#endif
#pragma omp simd
  for (int64_t c = first; c < end; ++c) {
    const float z = PerChannel ? zero[c] : zero[0];
    const float s = PerChannel ? scale[c] : scale[0];
    const float i = PerChannel ? inverse[c] : inverse[0];
    float v = std::nearbyint((row[c] - z) * i);
    v = std::min(std::max(v, 0.0f), levels);
    code[c] = uint8_t(v);
    residual[c] = skip[c] ? 0.0f : row[c] - (v * s + z);
  }
}

// code_span<true> on `rows` whole rows of d channels (at stride d) that share one zero / scale /
// inverse per channel: 16 channels at a time down the rows, their parameters loaded once.
inline void code_rows(const float* x, const uint8_t* skip, const float* zero, const float* scale,
                      const float* inverse, int64_t rows, int64_t d, float levels, uint8_t* code,
                      float* residual) {
  int64_t c = 0;
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  for (; c + 16 <= d; c += 16) {
    const __m512 z = _mm512_loadu_ps(zero + c), s = _mm512_loadu_ps(scale + c),
                 i = _mm512_loadu_ps(inverse + c);
    for (int64_t t = 0; t < rows; ++t)
      code16(x + t * d + c, skip + t * d + c, z, s, i, _mm512_set1_ps(levels), code + t * d + c,
             residual + t * d + c);
  }
#endif
  for (int64_t t = 0; t < rows && c < d; ++t)  // the channels left (all of them without AVX-512)
    code_span<true>(x + t * d, skip + t * d, zero, scale, inverse, c, d, levels, code + t * d,
                    residual + t * d);
}

// The min / max of row[begin..end) without the skipped entries.
inline void span_stats(const float* row, const uint8_t* skip, int64_t begin, int64_t end,
                       float* lo, float* hi) {
  const float inf = std::numeric_limits<float>::infinity();
  float l = inf, h = -inf;
#pragma omp simd reduction(min : l) reduction(max : h)
  for (int64_t c = begin; c < end; ++c) {
    const float low = skip[c] ? inf : row[c], high = skip[c] ? -inf : row[c];
    l = low < l ? low : l;
    h = high > h ? high : h;
  }
  *lo = l;
  *hi = h;
}

// Integer vectors beside vec16.h's v16 (GCC / Clang vector extensions).
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef int8_t i8x16 __attribute__((vector_size(16)));

// Lane `lane` of one level of a transposing reduction: inputs a (lanes 0..15) and b (16..31)
// hold rows in blocks of 2 * B lanes, the output in blocks of B; this picks the first half of
// each (B added: the second).
constexpr int fold_lane(int B, int lane) {
  return lane / B * 2 * B % 16 + lane % B + (lane / B >= 16 / (2 * B) ? 16 : 0);
}

template <int B, bool Max, int... L>
inline v16 fold_lanes(v16 a, v16 b, std::integer_sequence<int, L...>) {
  const v16 x = __builtin_shufflevector(a, b, fold_lane(B, L)...);
  const v16 y = __builtin_shufflevector(a, b, (fold_lane(B, L) + B)...);
  return Max ? (x > y ? x : y) : (x < y ? x : y);
}

// Each row block of a and b reduced with its other half: a's rows, then b's, in B lanes each.
template <int B, bool Max>
inline v16 fold(v16 a, v16 b) {
  return fold_lanes<B, Max>(a, b, std::make_integer_sequence<int, 16>());
}

// l / h: the lane-wise min / max with the lanes of v whose skip byte s is 0.
inline void keep_min_max(v16 v, u8x16 s, v16& l, v16& h) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  // the skip bytes tested straight into a lane mask, the min / max masked
  const __mmask16 kept = _mm_testn_epi8_mask(__m128i(s), __m128i(s));
  l = v16(_mm512_mask_min_ps(__m512(l), kept, __m512(v), __m512(l)));
  h = v16(_mm512_mask_max_ps(__m512(h), kept, __m512(v), __m512(h)));
#else
  // compared as bytes, then widened: a direct byte to int conversion is scalarized by GCC
  const float inf = std::numeric_limits<float>::infinity();
  const i32x16 kept = __builtin_convertvector(i8x16(s == 0), i32x16);
  const v16 low = kept ? v : inf, high = kept ? v : -inf;
  l = low < l ? low : l;
  h = high > h ? high : h;
#endif
}

// The lane-wise min / max of row[begin..end) (a multiple of 16 long) without the skipped
// entries, into l / h.
inline void lane_stats(const float* row, const uint8_t* skip, int64_t begin, int64_t end,
                       v16& l, v16& h) {
  const float inf = std::numeric_limits<float>::infinity();
  l = v16{} + inf;
  h = v16{} - inf;
  for (int64_t c = begin; c < end; c += 16) {
    u8x16 s;
    std::memcpy(&s, skip + c, sizeof s);
    keep_min_max(load16(row + c), s, l, h);
  }
}

// The min / max of W channels over rows rows (at stride) without the skipped entries, into
// lo[0..W) and hi[0..W): the W running values stay in registers (as 16-lane vectors where W
// allows).
template <int W>
inline void channel_stats(const float* x, const uint8_t* skip, int64_t stride, int64_t rows,
                          float* lo, float* hi) {
  const float inf = std::numeric_limits<float>::infinity();
  if constexpr (W % 16 == 0) {
    v16 l[W / 16], h[W / 16];
    for (int c = 0; c < W / 16; ++c) {
      l[c] = v16{} + inf;
      h[c] = v16{} - inf;
    }
    for (int64_t t = 0; t < rows; ++t)
      for (int c = 0; c < W / 16; ++c) {
        u8x16 s;
        std::memcpy(&s, skip + t * stride + 16 * c, sizeof s);
        keep_min_max(load16(x + t * stride + 16 * c), s, l[c], h[c]);
      }
    std::memcpy(lo, l, sizeof l);
    std::memcpy(hi, h, sizeof h);
  } else {
    float l[W], h[W];
    for (int c = 0; c < W; ++c) {
      l[c] = inf;
      h[c] = -inf;
    }
    for (int64_t t = 0; t < rows; ++t) {
      const float* row = x + t * stride;
      const uint8_t* s = skip + t * stride;
#pragma omp simd
      for (int c = 0; c < W; ++c) {
        const float low = s[c] ? inf : row[c], high = s[c] ? -inf : row[c];
        l[c] = low < l[c] ? low : l[c];
        h[c] = high > h[c] ? high : h[c];
      }
    }
    for (int c = 0; c < W; ++c) {
      lo[c] = l[c];
      hi[c] = h[c];
    }
  }
}

// span_stats of 16 rows (at stride) over [begin, end), a multiple of 16 long, into lo / hi at
// out_stride: lane-wise min / max per row, then one transposing tree for all 16 rows instead of
// a horizontal reduction per row (row pairs folded at once, so that all stays in registers).
inline void span_stats16(const float* x, const uint8_t* skip, int64_t stride, int64_t begin,
                         int64_t end, float* lo, float* hi, int64_t out_stride) {
  v16 l[8], h[8];
#pragma GCC unroll 8
  for (int p = 0; p < 8; ++p) {
    v16 l0, h0, l1, h1;
    lane_stats(x + 2 * p * stride, skip + 2 * p * stride, begin, end, l0, h0);
    lane_stats(x + (2 * p + 1) * stride, skip + (2 * p + 1) * stride, begin, end, l1, h1);
    l[p] = fold<8, false>(l0, l1);
    h[p] = fold<8, true>(h0, h1);
  }
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {
    l[p] = fold<4, false>(l[2 * p], l[2 * p + 1]);
    h[p] = fold<4, true>(h[2 * p], h[2 * p + 1]);
  }
#pragma GCC unroll 2
  for (int p = 0; p < 2; ++p) {
    l[p] = fold<2, false>(l[2 * p], l[2 * p + 1]);
    h[p] = fold<2, true>(h[2 * p], h[2 * p + 1]);
  }
  const v16 least = fold<1, false>(l[0], l[1]), most = fold<1, true>(h[0], h[1]);
  for (int t = 0; t < 16; ++t) {
    lo[t * out_stride] = least[t];
    hi[t * out_stride] = most[t];
  }
}

// row[c] = code[c] * scale + zero for c in [begin, end).
template <bool PerChannel>
inline void dequantize_span(float* row, const uint8_t* code, const float* zero,
                            const float* scale, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t c = begin; c < end; ++c)
    row[c] = float(code[c]) * (PerChannel ? scale[c] : scale[0]) +
             (PerChannel ? zero[c] : zero[0]);
}

// ------------------------------------------------------------------------------ low rank

// Applies the reflector I - tau v v^T (v = (1, col[j+1:m]) from row j on) to the column other.
inline void reflect(const float* col, float* other, float tau, int64_t j, int64_t m) {
  float w = other[j];
#pragma omp simd reduction(+ : w)
  for (int64_t i = j + 1; i < m; ++i) w += col[i] * other[i];
  w *= tau;
  other[j] -= w;
#pragma omp simd
  for (int64_t i = j + 1; i < m; ++i) other[i] -= w * col[i];
}

// Householder QR of the k columns (each m long, contiguous) of a, replaced by the explicit Q,
// as LAPACK's geqr2 + org2r: R's diagonal is -sign(alpha) * norm.
void householder_q(float* a, int64_t k, int64_t m, float* tau) {
  for (int64_t j = 0; j < k; ++j) {
    float* col = a + j * m;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = j + 1; i < m; ++i) sum += double(col[i]) * col[i];
    float alpha = col[j];
    if (sum == 0.0) {
      tau[j] = 0.0f;
      continue;
    }
    float norm = float(std::sqrt(double(alpha) * alpha + sum));
    float beta = alpha >= 0.0f ? -norm : norm;
    tau[j] = (beta - alpha) / beta;
    float scale = 1.0f / (alpha - beta);
    for (int64_t i = j + 1; i < m; ++i) col[i] *= scale;
    col[j] = beta;
    for (int64_t c = j + 1; c < k; ++c) reflect(col, a + c * m, tau[j], j, m);
  }
  for (int64_t j = k - 1; j >= 0; --j) {
    float* col = a + j * m;
    for (int64_t c = j + 1; c < k; ++c) reflect(col, a + c * m, tau[j], j, m);
    for (int64_t i = j + 1; i < m; ++i) col[i] *= -tau[j];
    col[j] = 1.0f - tau[j];
    for (int64_t i = 0; i < j; ++i) col[i] = 0.0f;
  }
}

typedef double v8d __attribute__((vector_size(64)));

// The Gram matrix G[i][j] = a_i . a_j (i >= j) of the K columns of a (each m long, contiguous),
// summed in double in one pass over the columns.
template <int K>
__attribute__((optimize("fp-contract=fast"))) void gram(const float* a, int64_t m,
                                                         double (*g)[8]) {
  v8d acc[K][K] = {};
  int64_t e = 0;
  for (; e + 16 <= m; e += 16) {
    v8d lo[K], hi[K];
    for (int i = 0; i < K; ++i) {
      const v16 x = load16(a + i * m + e);
      lo[i] = __builtin_convertvector(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7), v8d);
      hi[i] = __builtin_convertvector(
          __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15), v8d);
    }
    for (int i = 0; i < K; ++i)
      for (int j = 0; j <= i; ++j) acc[i][j] += lo[i] * lo[j] + hi[i] * hi[j];
  }
  for (int i = 0; i < K; ++i)
    for (int j = 0; j <= i; ++j) {
      double dot = 0.0;
      for (int l = 0; l < 8; ++l) dot += acc[i][j][l];
      for (int64_t t = e; t < m; ++t) dot += double(a[i * m + t]) * double(a[j * m + t]);
      g[i][j] = dot;
    }
}

// An orthonormal basis of the span of the K columns of a (each m long, contiguous), in place:
// a R^-1 with R the Cholesky factor of the Gram matrix (summed in double), in two passes over
// a. R is upper triangular with a positive diagonal, so a later householder_q of the iterates
// gives the same Q: the iteration's intermediate steps use this (no long dependency chain) and
// the last one householder_q. Near rank deficiency it is householder_q itself.
template <int K>
void orthonormalize_k(float* a, int64_t m, float* tau) {
  double low[8][8];  // Cholesky factor L = R^T
  gram<K>(a, m, low);
  for (int j = 0; j < K; ++j) {
    const double diagonal = low[j][j];
    double pivot = diagonal;
    for (int p = 0; p < j; ++p) pivot -= low[j][p] * low[j][p];
    if (!(pivot > 1e-6 * diagonal)) return householder_q(a, K, m, tau);  // nearly dependent
    low[j][j] = std::sqrt(pivot);
    for (int i = j + 1; i < K; ++i) {
      double v = low[i][j];
      for (int p = 0; p < j; ++p) v -= low[i][p] * low[j][p];
      low[i][j] = v / low[j][j];
    }
  }
  // inverse[p][j] = (R^-1)[p][j], upper triangular: q_j = sum_{p <= j} inverse[p][j] a_p
  double inverse[K][K] = {};
  for (int j = 0; j < K; ++j) {
    inverse[j][j] = 1.0 / low[j][j];
    for (int p = 0; p < j; ++p) {
      double v = 0.0;
      for (int t = p; t < j; ++t) v += inverse[p][t] * low[j][t];
      inverse[p][j] = -v * inverse[j][j];
    }
  }
  float weight[K][K];
  for (int p = 0; p < K; ++p)
    for (int j = 0; j < K; ++j) weight[p][j] = float(inverse[p][j]);
  int64_t e = 0;
  for (; e + 16 <= m; e += 16) {
    v16 x[K];
    for (int p = 0; p < K; ++p) x[p] = load16(a + p * m + e);
    for (int j = 0; j < K; ++j) {
      v16 q = x[0] * weight[0][j];
      for (int p = 1; p <= j; ++p) q += x[p] * weight[p][j];
      store16(a + j * m + e, q);
    }
  }
  for (; e < m; ++e) {
    float x[K];
    for (int p = 0; p < K; ++p) x[p] = a[p * m + e];
    for (int j = 0; j < K; ++j) {
      float q = x[0] * weight[0][j];
      for (int p = 1; p <= j; ++p) q += x[p] * weight[p][j];
      a[j * m + e] = q;
    }
  }
}

// orthonormalize_k for k columns (householder_q itself for k > 8).
void orthonormalize(float* a, int64_t k, int64_t m, float* tau) {
  switch (k) {
    case 1: return orthonormalize_k<1>(a, m, tau);
    case 2: return orthonormalize_k<2>(a, m, tau);
    case 3: return orthonormalize_k<3>(a, m, tau);
    case 4: return orthonormalize_k<4>(a, m, tau);
    case 5: return orthonormalize_k<5>(a, m, tau);
    case 6: return orthonormalize_k<6>(a, m, tau);
    case 7: return orthonormalize_k<7>(a, m, tau);
    case 8: return orthonormalize_k<8>(a, m, tau);
    default: return householder_q(a, k, m, tau);
  }
}

// out[j][i] = sum_c r[i][c] * v[j][c]   (R @ V, V given as k rows of d); four rows at a time
// so that four independent sums are in flight.
void times(const float* r, int64_t n, int64_t d, const float* v, int64_t k, float* out) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float *r0 = r + i * d, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
    for (int64_t j = 0; j < k; ++j) {
      const float* vj = v + j * d;
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t c = 0; c < d; ++c) {
        s0 = std::fma(r0[c], vj[c], s0);
        s1 = std::fma(r1[c], vj[c], s1);
        s2 = std::fma(r2[c], vj[c], s2);
        s3 = std::fma(r3[c], vj[c], s3);
      }
      float* o = out + j * n + i;
      o[0] = s0;
      o[1] = s1;
      o[2] = s2;
      o[3] = s3;
    }
  }
  for (; i < n; ++i) {
    const float* row = r + i * d;
    for (int64_t j = 0; j < k; ++j) {
      const float* vj = v + j * d;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < d; ++c) s = std::fma(row[c], vj[c], s);
      out[j * n + i] = s;
    }
  }
}

// out[j][c] = sum_i q[j][i] * r[i][c]   (R^T @ Q, Q given as k columns of n); four rows of R
// per pass over out.
void times_t(const float* r, int64_t n, int64_t d, const float* q, int64_t k, float* out) {
  std::fill(out, out + k * d, 0.0f);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float *r0 = r + i * d, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
    for (int64_t j = 0; j < k; ++j) {
      const float* w = q + j * n + i;
      float* oj = out + j * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c)
        oj[c] = std::fma(w[3], r3[c], std::fma(w[2], r2[c], std::fma(w[1], r1[c],
                                                                     std::fma(w[0], r0[c], oj[c]))));
    }
  }
  for (; i < n; ++i) {
    const float* row = r + i * d;
    for (int64_t j = 0; j < k; ++j) {
      const float w = q[j * n + i];
      float* oj = out + j * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) oj[c] = std::fma(w, row[c], oj[c]);
    }
  }
}

// The same products for K columns and D = head_dim known at compile time: the K x D
// accumulators (or the K rows of V) stay in vector registers; multiply-adds may fuse here (the
// fit only needs float32 accuracy, unlike the quantization).

// The sum of the 16 lanes, as a tree.
inline float sum16(v16 v) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

#if defined(__AVX512F__)
// The lane sums of 16 vectors, in order: a transposing tree of in-lane, 128-bit and 256-bit
// shuffles (45 operations instead of 16 separate reductions).
inline __m512 sum16_rows(const __m512* a) {
  __m512 t[8], u[4], w[2];
  for (int p = 0; p < 8; ++p)  // per 128-bit lane: rows 2p, 2p + 1, 2p, 2p + 1
    t[p] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * p], a[2 * p + 1]),
                         _mm512_unpackhi_ps(a[2 * p], a[2 * p + 1]));
  for (int q = 0; q < 4; ++q) {  // per 128-bit lane: rows 4q .. 4q + 3
    const __m512d lo = _mm512_castps_pd(t[2 * q]), hi = _mm512_castps_pd(t[2 * q + 1]);
    u[q] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi)));
  }
  for (int h = 0; h < 2; ++h)  // 128-bit lanes: rows 8h .. 8h + 3 twice, 8h + 4 .. 8h + 7 twice
    w[h] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * h], u[2 * h + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * h], u[2 * h + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88),
                       _mm512_shuffle_f32x4(w[0], w[1], 0xdd));
}
#endif

template <int K, int D>
__attribute__((optimize("fp-contract=fast"))) void times_fixed(const float* r, int64_t n, const float* v, float* out) {
  v16 vv[K][D / 16];
  for (int j = 0; j < K; ++j)
    for (int c = 0; c < D / 16; ++c) vv[j][c] = load16(v + j * D + 16 * c);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {  // sixteen rows per column, summed together
    for (int j = 0; j < K; ++j) {
      __m512 acc[16];
      // unrolled: the 16 rows' chains of dependent multiply-adds interleave
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) {
        v16 sum = {};
        for (int c = 0; c < D / 16; ++c) sum += load16(r + (i + t) * D + 16 * c) * vv[j][c];
        acc[t] = __m512(sum);
      }
      _mm512_storeu_ps(out + j * n + i, sum16_rows(acc));
    }
  }
#endif
  for (; i < n; ++i) {
    const float* row = r + i * D;
    for (int j = 0; j < K; ++j) {
      v16 acc = {};
      for (int c = 0; c < D / 16; ++c) acc += load16(row + 16 * c) * vv[j][c];
      out[j * n + i] = sum16(acc);
    }
  }
}

template <int K, int D>
__attribute__((optimize("fp-contract=fast"))) void times_t_fixed(const float* r, int64_t n, const float* q, float* out) {
  v16 acc[K][D / 16] = {};
  for (int64_t i = 0; i < n; ++i) {
    const float* row = r + i * D;
    for (int c = 0; c < D / 16; ++c) {
      const v16 x = load16(row + 16 * c);
      for (int j = 0; j < K; ++j) acc[j][c] += q[j * n + i] * x;
    }
  }
  for (int j = 0; j < K; ++j)
    for (int c = 0; c < D / 16; ++c) std::memcpy(out + j * D + 16 * c, &acc[j][c], 64);
}

// R @ V and R^T @ Q, on the fixed-size kernels where they apply.
template <bool Transposed>
void product(const float* r, int64_t n, int64_t d, const float* v, int64_t k, float* out) {
#define GEAR_FIXED(K, D)                                          \
  if (k == K && d == D) {                                         \
    if (Transposed) times_t_fixed<K, D>(r, n, v, out);            \
    else times_fixed<K, D>(r, n, v, out);                         \
    return;                                                       \
  }
  GEAR_FIXED(1, 64) GEAR_FIXED(2, 64) GEAR_FIXED(3, 64) GEAR_FIXED(4, 64)
  GEAR_FIXED(1, 128) GEAR_FIXED(2, 128) GEAR_FIXED(3, 128) GEAR_FIXED(4, 128)
#undef GEAR_FIXED
  if (Transposed) times_t(r, n, d, v, k, out);
  else times(r, n, d, v, k, out);
}

// Balances and rounds fitted factors like lowrank.LowRank.keep: column j of q (k columns of n)
// times 2**s and row j of p (k rows of d) over it, s = round(log2(max|p_j| / max|q_j|) / 2),
// then float16 (or bfloat16) bits into left [n, k] and right [k, d]. Returns 1 on overflow.
int32_t keep_factors(const float* q, const float* p, int64_t n, int64_t d, int64_t k, bool bf16,
                     uint16_t* left, uint16_t* right, float* scaled /* max(n, d) */) {
  int32_t bad = 0;
  for (int64_t j = 0; j < k; ++j) {
    float big_left = 0.0f, big_right = 0.0f;
    // a max is exact in any order: vectorized reductions (a plain loop stays scalar)
#pragma omp simd reduction(max : big_left)
    for (int64_t i = 0; i < n; ++i) big_left = std::max(big_left, std::fabs(q[j * n + i]));
#pragma omp simd reduction(max : big_right)
    for (int64_t c = 0; c < d; ++c) big_right = std::max(big_right, std::fabs(p[j * d + c]));
    float shift = std::nearbyint(0.5f * (std::log2(big_right) - std::log2(big_left)));
    const float factor = std::isfinite(shift) ? std::exp2(shift) : 1.0f;
    for (int64_t i = 0; i < n; ++i) scaled[i] = q[j * n + i] * factor;
    for (int64_t i = 0; i < n; ++i) {
      left[i * k + j] =
          bf16 ? float_to_bf16(scaled[i]) : half_bits(static_cast<_Float16>(scaled[i]));
    }
    for (int64_t c = 0; c < d; ++c) scaled[c] = p[j * d + c] / factor;
    if (bf16) {
      for (int64_t c = 0; c < d; ++c) right[j * d + c] = float_to_bf16(scaled[c]);
    } else {
      floats_to_halves(scaled, right + j * d, d);
    }
  }
  const uint16_t exponent = bf16 ? 0x7f80 : 0x7c00;  // all ones: inf or nan
  for (int64_t i = 0; i < n * k; ++i) bad |= (left[i] & exponent) == exponent;
  for (int64_t i = 0; i < k * d; ++i) bad |= (right[i] & exponent) == exponent;
  return bad;
}

// Lower-rank factors within a fitted subspace (lowrank.subspace_factors): q [k, n] (column j of
// the basis at q + j * n) and p = q^T r [k, d]; the SVD p = U S V^T comes from the eigenvectors
// of the Gram matrix p p^T [k, k] (cyclic Jacobi, double), and the leading j components give
// left [j, n] = q U sqrt(S) and right [j, d] = sqrt(S) V^T (a component with S = 0: zeros).
void subspace_lower(const float* q, const float* p, int64_t n, int64_t d, int64_t k, int64_t j,
                    float* left, float* right) {
  std::vector<double> g(k * k, 0.0), v(k * k, 0.0);
  for (int64_t a = 0; a < k; ++a) {
    v[a * k + a] = 1.0;
    for (int64_t b = 0; b <= a; ++b) {
      double s = 0.0;
      for (int64_t c = 0; c < d; ++c) s += double(p[a * d + c]) * p[b * d + c];
      g[a * k + b] = g[b * k + a] = s;
    }
  }
  for (int sweep = 0; sweep < 50; ++sweep) {
    double off = 0.0, diag = 0.0;
    for (int64_t a = 0; a < k; ++a)
      for (int64_t b = 0; b < k; ++b) (a == b ? diag : off) += g[a * k + b] * g[a * k + b];
    if (off <= 1e-30 * diag) break;
    for (int64_t a = 0; a < k; ++a) {
      for (int64_t b = a + 1; b < k; ++b) {
        const double gab = g[a * k + b];
        if (gab == 0.0) continue;
        const double theta = (g[b * k + b] - g[a * k + a]) / (2.0 * gab);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (int64_t r = 0; r < k; ++r) {  // columns a, b
          const double ra = g[r * k + a], rb = g[r * k + b];
          g[r * k + a] = c * ra - s * rb;
          g[r * k + b] = s * ra + c * rb;
        }
        for (int64_t r = 0; r < k; ++r) {  // rows a, b
          const double ar = g[a * k + r], br = g[b * k + r];
          g[a * k + r] = c * ar - s * br;
          g[b * k + r] = s * ar + c * br;
        }
        for (int64_t r = 0; r < k; ++r) {
          const double ra = v[r * k + a], rb = v[r * k + b];
          v[r * k + a] = c * ra - s * rb;
          v[r * k + b] = s * ra + c * rb;
        }
      }
    }
  }
  std::vector<int64_t> order(k);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return g[x * k + x] > g[y * k + y]; });
  std::vector<double> acc(std::max(n, d));
  for (int64_t t = 0; t < j; ++t) {
    const int64_t col = order[t];
    int64_t largest = 0;  // one sign per component: the largest entry of its eigenvector positive
    for (int64_t a = 1; a < k; ++a)
      if (std::fabs(v[a * k + col]) > std::fabs(v[largest * k + col])) largest = a;
    if (v[largest * k + col] < 0)
      for (int64_t a = 0; a < k; ++a) v[a * k + col] = -v[a * k + col];
    const double root = std::sqrt(std::sqrt(std::max(g[col * k + col], 0.0)));
    const double inverse = root > 0.0 ? 1.0 / root : 0.0;
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t a = 0; a < k; ++a) {
      const double w = v[a * k + col];
      for (int64_t i = 0; i < n; ++i) acc[i] += w * q[a * n + i];
    }
    for (int64_t i = 0; i < n; ++i) left[t * n + i] = float(acc[i] * root);
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t a = 0; a < k; ++a) {
      const double w = v[a * k + col];
      for (int64_t c = 0; c < d; ++c) acc[c] += w * p[a * d + c];
    }
    for (int64_t c = 0; c < d; ++c) right[t * d + c] = float(acc[c] * inverse);
  }
}

}  // namespace

extern "C" {

struct CompressArgs {
  const void* x;              // the body, dtype below; each matrix's [n, d] rows contiguous
  int32_t dtype;              // F16, BF16 or F32
  int32_t lead_ndim;          // leading dims of the body (matrices), their sizes and strides
  const int64_t* lead_sizes;
  const int64_t* lead_strides;
  int64_t matrices, n, d;
  int32_t bits, channel_axis;  // quantization: bits, group along tokens (1) or channels (0)
  int64_t group;               // group size, already clipped to the grouped length
  int32_t out_hi, out_lo;      // outliers per vector: largest (or largest |x|) and smallest
  int32_t magnitude, out_channel, index_bytes;
  int32_t rank, loops;         // subspace iteration; omega [d, rank] float32 row-major
  const float* omega;
  uint8_t* codes;              // ceil(M n d / 8) * bits bytes
  uint16_t* scale;             // float16 bits: [M, groups, 1, d] or [M, n, groups, 1]
  uint16_t* zero;
  void* out_values;            // [M, n, k] (token) or [M, k, d] (channel), input dtype
  void* out_index;             // same shape, index_bytes each
  int32_t factors;             // kept factors: 1 float16, 2 bfloat16
  void* left;                  // [M, n, rank]
  void* right;                 // [M, rank, d]
  int32_t lower;               // 0, or the rank of the best approximation within the fitted
  void* lower_left;            // subspace also kept (lowrank.subspace_factors): [M, n, lower]
  void* lower_right;           // and [M, lower, d]
  int32_t threads;
  int32_t* flags;              // [0]: some group's scales are unresolved; [1]: fp16 overflow
                               // of scales; [2]: of the kept factors; [3]: NaN / inf input
};

// Compresses every matrix; returns 0.
int gear_compress(const CompressArgs* a) {
  const int64_t n = a->n, d = a->d, nd = n * d;
  const int32_t k = a->out_hi + a->out_lo;
  const int64_t vectors = a->out_channel ? d : n, vec_len = a->out_channel ? n : d;
  const int64_t glen = a->channel_axis ? n : d, other = a->channel_axis ? d : n;
  const int64_t groups = (glen + a->group - 1) / a->group;
  const float levels = float((1 << a->bits) - 1);
  const int64_t esize = element_size(a->dtype);
  const int64_t code_bytes = nd / 8 * a->bits;
  int32_t unresolved = 0, overflow = 0, factor_overflow = 0, nonfinite = 0;

#pragma omp parallel num_threads(a->threads) \
    reduction(| : unresolved, overflow, factor_overflow, nonfinite)
  {
    // private copies: the byte stores below may alias *a, which would reload these
    const int32_t out_hi = a->out_hi, out_lo = a->out_lo, index_bytes = a->index_bytes;
    const bool out_channel = a->out_channel, magnitude = a->magnitude;
    void* const out_index = a->out_index;
    char* const out_values = static_cast<char*>(a->out_values);
    Buffer<float> x(nd), resid(nd);
    std::vector<float> key;
    Buffer<uint8_t> mask(nd), code(nd);
    Buffer<float> lo(groups * other), hi(groups * other), zf(groups * other),
        sf(groups * other), inv(groups * other);
    std::vector<int32_t> picked(std::max<int64_t>(k * vectors, 1));
    std::vector<Pair> queue;
    Buffer<float> q(a->rank * n), z(a->rank * d), omega_t(a->rank * d), tau(a->rank + 1),
        scratch(std::max(n, d)), low_q(a->lower * n), low_p(a->lower * d);
    for (int64_t j = 0; j < a->rank; ++j)
      for (int64_t c = 0; c < d; ++c) omega_t[j * d + c] = a->omega[c * a->rank + j];

#pragma omp for schedule(dynamic, 4)
    for (int64_t m = 0; m < a->matrices; ++m) {
      const int64_t off = matrix_offset(m, a->lead_ndim, a->lead_sizes, a->lead_strides);
      const char* src = static_cast<const char*>(a->x) + off * esize;
      if (load_matrix(src, a->dtype, nd, x.data())) {  // the caller raises: nothing to compute
        nonfinite = 1;
        continue;
      }

      // Outliers S: exact count per vector, excluded from the statistics below.
      std::fill(mask.begin(), mask.end(), 0);
      if (k > 0) {
        const int64_t vstride = out_channel ? d : 1, step = out_channel ? 1 : d;
        // every vector's picks first, then their stores: the selections do not wait on the
        // stores, whose addresses come at the end of each selection's chain
        for (int64_t v = 0; v < vectors; ++v)
          pick_vector(x.data() + v * step, vstride, vec_len, out_hi, out_lo, magnitude,
                      a->dtype != F32, picked.data() + v * k, key, queue);
        for (int64_t v = 0; v < vectors; ++v) {
          for (int32_t j = 0; j < k; ++j) {
            const int32_t at = picked[v * k + j];
            const int64_t pos = out_channel ? int64_t(at) * d + v : v * d + at;
            const int64_t slot = out_channel ? m * k * d + int64_t(j) * d + v
                                             : (m * n + v) * k + j;
            mask[pos] = 1;
            store_index(out_index, index_bytes, slot, at);
            char* value = out_values + slot * esize;
            if (esize == 2) std::memcpy(value, src + pos * 2, 2);  // fixed sizes: no call
            else std::memcpy(value, src + pos * 4, 4);
          }
        }
      }

      // Grouped min / max without outliers; float16 zero (down) and scale (up).
      if (a->channel_axis) {  // per channel over each group's rows, W channels at a time
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t first = g * a->group, rows = std::min(n, first + a->group) - first;
          const float* block = x.data() + first * d;
          const uint8_t* skip = mask.data() + first * d;
          float *l = lo.data() + g * d, *h = hi.data() + g * d;
          int64_t c = 0;
          for (; c + 64 <= d; c += 64) channel_stats<64>(block + c, skip + c, d, rows, l + c, h + c);
          for (; c + 16 <= d; c += 16) channel_stats<16>(block + c, skip + c, d, rows, l + c, h + c);
          for (; c < d; ++c) channel_stats<1>(block + c, skip + c, d, rows, l + c, h + c);
        }
      } else {  // per group along each row, 16 rows at a time where the groups split in 16s
        const bool whole = a->group % 16 == 0 && d % 16 == 0;
        int64_t t = 0;
        for (; whole && t + 16 <= n; t += 16)
          for (int64_t g = 0; g < groups; ++g)
            span_stats16(x.data() + t * d, mask.data() + t * d, d, g * a->group,
                         std::min(d, (g + 1) * a->group), lo.data() + t * groups + g,
                         hi.data() + t * groups + g, groups);
        for (; t < n; ++t)
          for (int64_t g = 0; g < groups; ++g)
            span_stats(x.data() + t * d, mask.data() + t * d, g * a->group,
                       std::min(d, (g + 1) * a->group), lo.data() + t * groups + g,
                       hi.data() + t * groups + g);
      }
      const int64_t stats = groups * other;
      uint16_t* scale = a->scale + m * stats;
      uint16_t* zero = a->zero + m * stats;
#pragma omp simd
      for (int64_t s = 0; s < stats; ++s) {  // empty groups (all outliers) get (0, 0)
        const bool empty = lo[s] > hi[s];
        lo[s] = empty ? 0.0f : lo[s];
        hi[s] = empty ? 0.0f : hi[s];
      }
      round_outward(lo.data(), zero, zf.data(), stats, false);
#pragma omp simd
      for (int64_t s = 0; s < stats; ++s) inv[s] = (hi[s] - zf[s]) / levels;  // scale, exact
      round_outward(inv.data(), scale, sf.data(), stats, true);
      int32_t bad = 0, coarse = 0;
#pragma omp simd reduction(| : bad, coarse)
      for (int64_t s = 0; s < stats; ++s) {
        bad |= (zero[s] & 0x7c00) == 0x7c00 || (scale[s] & 0x7c00) == 0x7c00;  // inf
        const float step_ = (hi[s] - lo[s]) / levels;
        const float error = sf[s] > 0.0f ? sf[s] / 2.0f : lo[s] - zf[s];
        const float big = std::fabs(lo[s]) > std::fabs(hi[s]) ? std::fabs(lo[s]) : std::fabs(hi[s]);
        const float allowed = step_ > big * 0.001953125f ? step_ : big * 0.001953125f;
        coarse |= error > allowed;
        inv[s] = sf[s] > 0.0f ? 1.0f / sf[s] : 0.0f;
      }
      overflow |= bad;
      unresolved |= coarse;

      // Codes; the residual X - D (zero at outliers) for the low rank.
      if (a->channel_axis) {
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t e = g * a->group * d, rows = std::min(n, (g + 1) * a->group) - g * a->group;
          code_rows(x.data() + e, mask.data() + e, zf.data() + g * d, sf.data() + g * d,
                    inv.data() + g * d, rows, d, levels, code.data() + e, resid.data() + e);
        }
      } else {
        for (int64_t t = 0; t < n; ++t) {
          const int64_t e = t * d;
          for (int64_t g = 0; g < groups; ++g) {
            const int64_t s = t * groups + g, end = std::min(d, (g + 1) * a->group);
            code_span<false>(x.data() + e, mask.data() + e, zf.data() + s, sf.data() + s,
                             inv.data() + s, g * a->group, end, levels, code.data() + e,
                             resid.data() + e);
          }
        }
      }
      by_bits<Pack>(a->bits, code.data(), a->codes + m * code_bytes, nd);

      // the next matrix's rows, fetched while this one's low rank is fitted: a share before
      // each product (a burst of 256 prefetches stalls on the outstanding misses)
      const char* ahead = nullptr;
      if (m + 1 < a->matrices)
        ahead = static_cast<const char*>(a->x) +
                matrix_offset(m + 1, a->lead_ndim, a->lead_sizes, a->lead_strides) * esize;
      const int64_t lines = (nd * esize + 63) / 64, shares = a->rank ? 2 + 2 * a->loops : 1;
      int64_t fetched = 0;
      auto fetch = [&](int64_t share) {
        const int64_t until = ahead ? lines * share / shares : 0;
        for (; fetched < until; ++fetched) __builtin_prefetch(ahead + 64 * fetched);
      };

      // Low rank L: seeded subspace iteration on the residual.
      if (a->rank) {
        const int64_t r = a->rank;
        fetch(1);
        product<false>(resid.data(), n, d, omega_t.data(), r, q.data());
        (a->loops ? orthonormalize : householder_q)(q.data(), r, n, tau.data());
        for (int32_t loop = 0; loop < a->loops; ++loop) {
          fetch(2 + 2 * loop);
          product<true>(resid.data(), n, d, q.data(), r, z.data());
          orthonormalize(z.data(), r, d, tau.data());
          fetch(3 + 2 * loop);
          product<false>(resid.data(), n, d, z.data(), r, q.data());
          (loop + 1 < a->loops ? orthonormalize : householder_q)(q.data(), r, n, tau.data());
        }
        // kept factors, balanced as lowrank.LowRank.keep
        fetch(shares);
        product<true>(resid.data(), n, d, q.data(), r, z.data());
        factor_overflow |= keep_factors(q.data(), z.data(), n, d, r, a->factors == 2,
                                        static_cast<uint16_t*>(a->left) + m * n * r,
                                        static_cast<uint16_t*>(a->right) + m * r * d,
                                        scratch.data());
        if (a->lower) {
          const int64_t j = a->lower;
          subspace_lower(q.data(), z.data(), n, d, r, j, low_q.data(), low_p.data());
          factor_overflow |= keep_factors(low_q.data(), low_p.data(), n, d, j, a->factors == 2,
                                          static_cast<uint16_t*>(a->lower_left) + m * n * j,
                                          static_cast<uint16_t*>(a->lower_right) + m * j * d,
                                          scratch.data());
        }
      }
      fetch(shares);  // without a low rank: all of it now
    }
  }
  a->flags[0] = unresolved;
  a->flags[1] = overflow;
  a->flags[2] = factor_overflow;
  a->flags[3] = nonfinite;
  return 0;
}

struct DecompressArgs {
  const uint8_t* codes;
  const uint16_t* scale;  // float16 bits, layout as in CompressArgs
  const uint16_t* zero;
  int32_t bits, channel_axis;
  int64_t group, matrices, n, d;
  const void* out_values;  // outliers in the output dtype, or null
  const void* out_index;
  int32_t out_k, out_channel, index_bytes;
  const uint16_t* left;    // [M, n, rank] and [M, rank, d], float16 / bfloat16 bits, or null
  const uint16_t* right;
  int32_t rank, factor_bf16;
  void* out;               // matrix m at the element offset its index has in the leading
  int32_t lead_ndim;       // dims (sizes / strides below), its [n, d] rows contiguous
  const int64_t* lead_sizes;
  const int64_t* lead_strides;
  int32_t dtype;
  int32_t threads;
};

// Reconstructs every matrix straight into its place in out (float32: built there, no copy):
// dequantize, add left @ right, write the outliers back, clamp into the dtype's finite range
// and round; returns 0.
int gear_decompress(const DecompressArgs* a) {
  const int64_t n = a->n, d = a->d, nd = n * d, r = a->rank;
  const int64_t glen = a->channel_axis ? n : d, other = a->channel_axis ? d : n;
  const int64_t groups = (glen + a->group - 1) / a->group;
  const int64_t code_bytes = nd / 8 * a->bits;
  const int64_t esize = element_size(a->dtype);
  const float limit = a->dtype == F16 ? 65504.0f : bf16_to_float(0x7f7f);  // F16 / BF16

#pragma omp parallel num_threads(a->threads)
  {
    Buffer<float> work(a->dtype == F32 ? 0 : nd), lf(n * r), rf(r * d),
        sf(groups * other), zf(groups * other);
    Buffer<uint8_t> code(nd);
    Buffer<float> acc(d);
#pragma omp for schedule(dynamic, 4)
    for (int64_t m = 0; m < a->matrices; ++m) {
      char* dst = static_cast<char*>(a->out) +
                  matrix_offset(m, a->lead_ndim, a->lead_sizes, a->lead_strides) * esize;
      float* y = a->dtype == F32 ? reinterpret_cast<float*>(dst) : work.data();
      halves_to_floats(a->scale + m * groups * other, sf.data(), groups * other);
      halves_to_floats(a->zero + m * groups * other, zf.data(), groups * other);
      by_bits<Unpack>(a->bits, a->codes + m * code_bytes, code.data(), nd);
      for (int64_t t = 0; t < n; ++t) {
        float* row = y + t * d;
        const uint8_t* codes = code.data() + t * d;
        if (a->channel_axis) {
          const int64_t base = (t / a->group) * d;
          dequantize_span<true>(row, codes, zf.data() + base, sf.data() + base, 0, d);
        } else {
          for (int64_t g = 0; g < groups; ++g) {
            const int64_t s = t * groups + g;
            dequantize_span<false>(row, codes, zf.data() + s, sf.data() + s, g * a->group,
                                   std::min(d, (g + 1) * a->group));
          }
        }
      }
      if (r) {
        const uint16_t* lsrc = a->left + m * n * r;
        const uint16_t* rsrc = a->right + m * r * d;
        if (a->factor_bf16) {
          for (int64_t i = 0; i < n * r; ++i) lf[i] = bf16_to_float(lsrc[i]);
          for (int64_t i = 0; i < r * d; ++i) rf[i] = bf16_to_float(rsrc[i]);
        } else {
          halves_to_floats(lsrc, lf.data(), n * r);
          halves_to_floats(rsrc, rf.data(), r * d);
        }
        for (int64_t t = 0; t < n; ++t) {  // row += (sum_j left[t, j] right[j]), j in order
          float* row = y + t * d;
          const float l0 = lf[t * r];
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) acc[c] = l0 * rf[c];
          for (int64_t j = 1; j < r; ++j) {
            const float lj = lf[t * r + j];
            const float* rj = rf.data() + j * d;
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) acc[c] += lj * rj[c];
          }
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) row[c] += acc[c];
        }
      }
      // the outliers in slot order: [k, d] (channel) or [n, k] (token) per matrix, as
      // outer x inner (no division per outlier)
      const int64_t k = a->out_values ? a->out_k : 0;
      const int64_t outer = a->out_channel ? k : n, inner = a->out_channel ? d : k;
      for (int64_t i = 0; i < outer; ++i)
        for (int64_t j = 0; j < inner; ++j) {
          const int64_t slot = (m * outer + i) * inner + j;
          const int64_t idx = load_index(a->out_index, a->index_bytes, slot);
          const int64_t pos = a->out_channel ? idx * d + j : i * d + idx;
          const char* v = static_cast<const char*>(a->out_values) + slot * esize;
          float value;
          if (a->dtype == F16) value = float(bits_half(*reinterpret_cast<const uint16_t*>(v)));
          else if (a->dtype == BF16) value = bf16_to_float(*reinterpret_cast<const uint16_t*>(v));
          else value = *reinterpret_cast<const float*>(v);
          y[pos] = value;
        }
      if (a->dtype != F32)  // float32 is the compute dtype: the reference does not clamp
        for (int64_t i = 0; i < nd; ++i) y[i] = std::min(std::max(y[i], -limit), limit);
      if (a->dtype == F16) {
        floats_to_halves(y, reinterpret_cast<uint16_t*>(dst), nd);
      } else if (a->dtype == BF16) {
        uint16_t* o = reinterpret_cast<uint16_t*>(dst);
        for (int64_t i = 0; i < nd; ++i) o[i] = float_to_bf16(y[i]);
      }
    }
  }
  return 0;
}

}  // extern "C"
