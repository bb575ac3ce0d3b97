// The batched attention error of one causal block of query rows
// (gear_lab.metrics.AttentionReference.error_stack), fused per (config, tile of rows): the score
// errors d = (scaling q) dk^T of the rows' visible keys (a register-tiled product), then per
// row, from d and the exact probabilities p,
//   m = sum_j p d,  x = d - m,  e = expm1(x),  phi = e - x,  w = p e,  z = sum_j w,
// and the output error (w v - z o + (w + p) dv) / (1 + z), each formed in a per-thread buffer
// that stays in cache. Each config's sums over the rows are added to the caller's float64 sums:
// score error^2, KL = log1p(sum p phi), sum |w - p z| / (1 + z) and the output error^2; a row
// with |x| beyond max_shift (or NaN) flags its config, which the caller recomputes exactly.
// expm1 and phi = expm1(x) - x without cancellation: x = n ln2 + r (|r| <= ln2 / 2),
// phi(r) = r^2 P(r) with P the Taylor polynomial to r^7 (relative error < 2e-9), and for n != 0
// expm1(x) = 2^n expm1(r) + (2^n - 1), phi = expm1(x) - x (|x| > ln2 / 2: no cancellation).
// Compile with -ffp-contract=off (gear_cpu.cpp's rule): the fused steps here are explicit
// (__builtin_fmaf, and the two products under fp-contract=fast).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec16.h"

namespace {

// phi(x) = expm1(x) - x and expm1(x), for |x| <= 87.
inline void phi_expm1(float x, float& phi, float& em1) {
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = __builtin_fmaf(n, -0.693145751953125f, x);  // ln 2, high part (exact product)
    r = __builtin_fmaf(n, -1.428606765330187045e-06f, r);  // ln 2, low part
    float q = 1.f / 362880.f;
    q = __builtin_fmaf(q, r, 1.f / 40320.f);
    q = __builtin_fmaf(q, r, 1.f / 5040.f);
    q = __builtin_fmaf(q, r, 1.f / 720.f);
    q = __builtin_fmaf(q, r, 1.f / 120.f);
    q = __builtin_fmaf(q, r, 1.f / 24.f);
    q = __builtin_fmaf(q, r, 1.f / 6.f);
    q = __builtin_fmaf(q, r, 0.5f);
    const float phi_r = r * r * q;
    const float em1_r = r + phi_r;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, |n| <= 126
    float s;
    std::memcpy(&s, &bits, sizeof s);
    const float em1_n = __builtin_fmaf(s, em1_r, s - 1.f);
    em1 = n == 0.f ? em1_r : em1_n;
    phi = n == 0.f ? phi_r : em1_n - x;
}

// The two products run on vec16.h's 16-lane vectors, in register tiles of kScoreRows x
// kScoreVecs and kOutRows x kOutVecs vectors sized for AVX-512's 32 registers (one v16 each);
// elsewhere a v16 spans two or four registers, hence smaller tiles.
constexpr int W = 16;
#if defined(__AVX512F__)
constexpr int kScoreRows = 12, kScoreVecs = 2, kOutRows = 6, kOutVecs = 4;
#else
constexpr int kScoreRows = 4, kScoreVecs = 1, kOutRows = 2, kOutVecs = 2;
#endif
constexpr int kKeyTile = W * kScoreVecs;  // keys per tile of the score product

// d[r][j] = sum_t q[r][t] kt[t][j] for kScoreRows rows and keys [j0, j1) (multiples of kKeyTile
// apart): q rows at qrow[r], kt [dim][kstride] (the keys transposed), d rows kstride apart.
__attribute__((optimize("fp-contract=fast"))) void score_tile(
    const float* const* qrow, const float* kt, int64_t kstride, int64_t dim, int64_t j0,
    int64_t j1, float* d) {
    for (int64_t j = j0; j < j1; j += kKeyTile) {
        v16 acc[kScoreRows][kScoreVecs] = {};
        for (int64_t t = 0; t < dim; ++t) {
            v16 k[kScoreVecs];
            for (int v = 0; v < kScoreVecs; ++v) k[v] = load16(kt + t * kstride + j + v * W);
            for (int r = 0; r < kScoreRows; ++r)
                for (int v = 0; v < kScoreVecs; ++v) acc[r][v] += qrow[r][t] * k[v];
        }
        for (int r = 0; r < kScoreRows; ++r)
            for (int v = 0; v < kScoreVecs; ++v) store16(d + r * kstride + j + v * W, acc[r][v]);
    }
}

// out[r][c] += sum_{j in [j0, j1)} a[r][j] b[j][c] for R rows (a rows astride apart, out rows dim
// apart) and the columns [c0, c1) (a multiple of V * W apart) of b [keys][dim] (rows dim apart).
template <int R, int V>
__attribute__((optimize("fp-contract=fast"))) void weighted_tile(
    const float* a, int64_t astride, const float* b, int64_t dim, int64_t c0, int64_t c1,
    int64_t j0, int64_t j1, float* out) {
    for (int64_t c = c0; c < c1; c += V * W) {
        v16 acc[R][V];
        for (int i = 0; i < R; ++i)
            for (int v = 0; v < V; ++v) acc[i][v] = load16(out + i * dim + c + v * W);
        for (int64_t j = j0; j < j1; ++j) {
            v16 bv[V];
            for (int v = 0; v < V; ++v) bv[v] = load16(b + j * dim + c + v * W);
            for (int i = 0; i < R; ++i)
                for (int v = 0; v < V; ++v) acc[i][v] += a[i * astride + j] * bv[v];
        }
        for (int i = 0; i < R; ++i)
            for (int v = 0; v < V; ++v) store16(out + i * dim + c + v * W, acc[i][v]);
    }
}

// weighted_tile over rows [0, n) and every column: tiles of kOutRows rows, then single rows;
// kOutVecs vectors of columns at a time, then one, then the last columns one by one.
void weighted_sum(const float* a, int64_t astride, int64_t n, const float* b, int64_t dim,
                  int64_t j0, int64_t j1, float* out) {
    const int64_t wide = dim / (kOutVecs * W) * (kOutVecs * W), narrow = dim / W * W;
    int64_t r = 0;
    for (; r + kOutRows <= n; r += kOutRows) {
        const float* ar = a + r * astride;
        weighted_tile<kOutRows, kOutVecs>(ar, astride, b, dim, 0, wide, j0, j1, out + r * dim);
        weighted_tile<kOutRows, 1>(ar, astride, b, dim, wide, narrow, j0, j1, out + r * dim);
    }
    for (; r < n; ++r) {
        const float* ar = a + r * astride;
        weighted_tile<1, kOutVecs>(ar, astride, b, dim, 0, wide, j0, j1, out + r * dim);
        weighted_tile<1, 1>(ar, astride, b, dim, wide, narrow, j0, j1, out + r * dim);
    }
    for (int64_t i = 0; i < n; ++i) {
        for (int64_t c = narrow; c < dim; ++c) {
            float acc = out[i * dim + c];
            for (int64_t j = j0; j < j1; ++j)
                acc = __builtin_fmaf(a[i * astride + j], b[j * dim + c], acc);
            out[i * dim + c] = acc;
        }
    }
}

}  // namespace

extern "C" {

struct AttentionBlockArgs {
    const float* q;     // [rows, dim]: scaling * queries
    const float* p;     // [rows, keys]: exact probabilities (0 at hidden keys)
    const float* o;     // [rows, dim]: the exact output p v
    const float* v;     // [keys, dim]: the exact values
    const int32_t* lo;  // [rows]: first visible key of each row
    const int32_t* hi;  // [rows]: one past its last visible key
    const float* dk;    // config c's key errors [keys, dim] at dk + c * dk_stride (null: exact)
    const float* dv;    // its value errors at dv + c * dv_stride (null: exact)
    int64_t dk_stride, dv_stride;
    int64_t configs, rows, keys, dim;
    double* sums;       // [4, configs], added to: score error^2, KL, |p_hat - p|, output error^2
    uint8_t* shifted;   // [configs], or-ed: a score shift beyond max_shift (or NaN)
    float max_shift;
    int32_t threads;
};

int gear_attention_block(const AttentionBlockArgs* a) {
    const int64_t rows = a->rows, keys = a->keys, dim = a->dim, configs = a->configs;
    if (rows <= 0 || keys <= 0 || configs <= 0) return 0;
    // work items: (config, share of the rows), enough of them for every thread
    const int64_t splits = std::max<int64_t>(1, (a->threads + configs - 1) / configs);
    const int64_t per = ((rows + splits - 1) / splits + kScoreRows - 1) / kScoreRows * kScoreRows;
    const int64_t items = configs * splits;
    std::vector<double> partial(items * 5, 0.0);
    const float limit = a->max_shift;
#pragma omp parallel num_threads(a->threads)
    {
        const int64_t kpad = (keys + kKeyTile - 1) / kKeyTile * kKeyTile;
        std::vector<float> kt(a->dk ? dim * kpad : 0), zeros(dim, 0.f);
        std::vector<float> d(kScoreRows * kpad), u(a->dk && a->dv ? kScoreRows * kpad : 0);
        std::vector<float> out(kScoreRows * dim);
#pragma omp for schedule(dynamic)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t c = item / splits, r0 = item % splits * per;
            const int64_t r1 = std::min(rows, r0 + per);
            if (r0 >= r1) continue;
            const float* dk = a->dk ? a->dk + c * a->dk_stride : nullptr;
            const float* dv = a->dv ? a->dv + c * a->dv_stride : nullptr;
            const int64_t kend = *std::max_element(a->hi + r0, a->hi + r1);
            if (dk) {  // the keys transposed, [dim][kpad], zero past kend
                for (int64_t t = 0; t < dim; ++t) {
                    float* row = kt.data() + t * kpad;
                    for (int64_t j = 0; j < kend; ++j) row[j] = dk[j * dim + t];
                    std::fill(row + kend, row + kpad, 0.f);
                }
            }
            double* sum = partial.data() + item * 5;
            for (int64_t t0 = r0; t0 < r1; t0 += kScoreRows) {
                const int64_t n = std::min<int64_t>(kScoreRows, r1 - t0);
                const int64_t jlo = *std::min_element(a->lo + t0, a->lo + t0 + n);
                const int64_t jhi = *std::max_element(a->hi + t0, a->hi + t0 + n);
                const int64_t j0 = jlo / kKeyTile * kKeyTile;
                const int64_t j1 = (jhi + kKeyTile - 1) / kKeyTile * kKeyTile;
                std::fill(out.begin(), out.end(), 0.f);
                float z[kScoreRows] = {};
                if (dk) {
                    const float* qrow[kScoreRows];
                    for (int r = 0; r < kScoreRows; ++r)
                        qrow[r] = r < n ? a->q + (t0 + r) * dim : zeros.data();
                    score_tile(qrow, kt.data(), kpad, dim, j0, j1, d.data());
                    for (int64_t r = 0; r < n; ++r) {
                        const int64_t row = t0 + r, lo = a->lo[row], hi = a->hi[row];
                        float* dr = d.data() + r * kpad;
                        const float* p = a->p + row * keys;
                        float s2 = 0.f, m = 0.f;
#pragma omp simd reduction(+ : s2, m)
                        for (int64_t j = lo; j < hi; ++j) {
                            s2 += dr[j] * dr[j];
                            m += p[j] * dr[j];
                        }
                        float phip = 0.f, zr = 0.f;
                        int32_t flag = 0;
#pragma omp simd reduction(+ : phip, zr) reduction(| : flag)
                        for (int64_t j = lo; j < hi; ++j) {
                            const float x = dr[j] - m;
                            flag |= !(std::fabs(x) <= limit);  // NaN too
                            // clamped so that 2^n stays finite; a flagged config is recomputed
                            const float xc = x > 87.f ? 87.f : (x < -87.f ? -87.f : x);
                            float phi, em1;
                            phi_expm1(xc, phi, em1);
                            phip += p[j] * phi;
                            const float w = p[j] * em1;
                            dr[j] = w;
                            zr += w;
                        }
                        float tv = 0.f;
#pragma omp simd reduction(+ : tv)
                        for (int64_t j = lo; j < hi; ++j) tv += std::fabs(dr[j] - p[j] * zr);
                        std::fill(dr + j0, dr + lo, 0.f);
                        std::fill(dr + hi, dr + j1, 0.f);
                        const double norm = 1.0 + zr;
                        sum[0] += s2;
                        sum[1] += std::log1p(static_cast<double>(phip));
                        sum[2] += tv / norm;
                        sum[4] = std::max<double>(sum[4], flag);
                        z[r] = zr;
                    }
                    weighted_sum(d.data(), kpad, n, a->v, dim, j0, std::min(j1, keys), out.data());
                }
                if (dv && !dk) {  // p dv
                    weighted_sum(a->p + t0 * keys, keys, n, dv, dim, j0, std::min(j1, keys),
                                 out.data());
                } else if (dv) {  // (w + p) dv
                    const int64_t end = std::min(j1, keys);
                    for (int64_t r = 0; r < n; ++r) {
                        const float* p = a->p + (t0 + r) * keys;
                        const float* wr = d.data() + r * kpad;
                        float* ur = u.data() + r * kpad;
                        for (int64_t j = j0; j < end; ++j) ur[j] = wr[j] + p[j];
                    }
                    weighted_sum(u.data(), kpad, n, dv, dim, j0, end, out.data());
                }
                for (int64_t r = 0; r < n; ++r) {
                    const float* o = a->o + (t0 + r) * dim;
                    double e2 = 0.0;
                    for (int64_t t = 0; t < dim; ++t) {
                        const float e = out[r * dim + t] - z[r] * o[t];
                        e2 += static_cast<double>(e) * e;
                    }
                    const double norm = 1.0 + z[r];
                    sum[3] += e2 / (norm * norm);
                }
            }
        }
    }
    for (int64_t item = 0; item < items; ++item) {
        const int64_t c = item / splits;
        const double* s = partial.data() + item * 5;
        for (int k = 0; k < 4; ++k) a->sums[k * configs + c] += s[k];
        a->shifted[c] |= s[4] > 0;
    }
    return 0;
}

}  // extern "C"
