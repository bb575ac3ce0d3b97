// Per-row sums of the batched attention error (gear_lab.metrics.AttentionReference.error_stack):
// for each (config, query row) of a causal block, from the score error d (the row of
// scaling * q (k_hat - k)^T over the block's keys) and the exact probabilities p,
//   m = sum_j p d,  x = d - m,  e = expm1(x),  phi = e - x,  w = p e,  z = sum_j w,
// the row's  sum d^2,  sum p phi,  z,  sum |w - p z|  and a flag where |x| exceeds max_shift
// (or is NaN), and w written over d (0 outside the row's visible keys) for the output error,
// which the caller forms with one product: (w v - z o) / (1 + z).
// One pass for m and sum d^2, one for e, phi and w, one for the total variation; expm1 and
// phi = expm1(x) - x without cancellation: x = n ln2 + r (|r| <= ln2 / 2), phi(r) = r^2 P(r)
// with P the Taylor polynomial to r^7 (relative error < 2e-9), and for n != 0
// expm1(x) = 2^n expm1(r) + (2^n - 1), phi = expm1(x) - x (|x| > ln2 / 2: no cancellation).
// Compile with -ffp-contract=off (gear_cpu.cpp's rule); the fused steps here are explicit.

#include <cmath>
#include <cstdint>
#include <cstring>

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

}  // namespace

extern "C" {

struct AttentionRowsArgs {
    float* d;           // [configs, rows, keys]: score errors in, w = p expm1(x) out
    const float* p;     // [rows, keys]: exact probabilities (0 at hidden keys)
    const int32_t* lo;  // [rows]: first visible key of each row
    const int32_t* hi;  // [rows]: one past its last visible key
    int64_t configs, rows, keys;
    float* out;         // [5, configs, rows]: sum d^2, sum p phi, z, sum |w - p z|, flag (0 / 1)
    float max_shift;
    int32_t threads;
};

int gear_attention_rows(const AttentionRowsArgs* a) {
    const int64_t total = a->configs * a->rows, keys = a->keys;
    const float limit = a->max_shift;
#pragma omp parallel for schedule(static) num_threads(a->threads)
    for (int64_t cr = 0; cr < total; ++cr) {
        const int64_t row = cr % a->rows;
        float* d = a->d + cr * keys;
        const float* p = a->p + row * keys;
        const int64_t lo = a->lo[row], hi = a->hi[row];
        float s2 = 0.f, m = 0.f;
#pragma omp simd reduction(+ : s2, m)
        for (int64_t j = lo; j < hi; ++j) {
            s2 += d[j] * d[j];
            m += p[j] * d[j];
        }
        float phip = 0.f, z = 0.f;
        int32_t flag = 0;
#pragma omp simd reduction(+ : phip, z) reduction(| : flag)
        for (int64_t j = lo; j < hi; ++j) {
            const float x = d[j] - m;
            flag |= !(std::fabs(x) <= limit);  // NaN too
            // clamped so that 2^n stays finite; a flagged row is recomputed by the caller
            const float xc = x > 87.f ? 87.f : (x < -87.f ? -87.f : x);
            float phi, em1;
            phi_expm1(xc, phi, em1);
            phip += p[j] * phi;
            const float w = p[j] * em1;
            d[j] = w;
            z += w;
        }
        float tv = 0.f;
#pragma omp simd reduction(+ : tv)
        for (int64_t j = lo; j < hi; ++j) tv += std::fabs(d[j] - p[j] * z);
        std::memset(d, 0, sizeof(float) * lo);
        std::memset(d + hi, 0, sizeof(float) * (keys - hi));
        float* out = a->out + cr;
        out[0] = s2;
        out[total] = phip;
        out[2 * total] = z;
        out[3 * total] = tv;
        out[4 * total] = static_cast<float>(flag);
    }
    return 0;
}

}  // extern "C"
