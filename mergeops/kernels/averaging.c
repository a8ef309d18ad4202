/* Elementwise merges of the averaging family for float32 on the CPU, one pass instead of a
 * torch op (and a fresh temporary) per step. Each element sees the torch reference's
 * operations in its order and rounding (built with -ffp-contract=off, no fast-math).
 */
#include <stdint.h>

/* nearswap (mergeops.ops.fusion.nearswap, t > 0):
 *   w = clamp((1 / max(|base - other|, 1e-6)) * t, 0, 1)   (torch's t / x is x.reciprocal() * t)
 *   out = w * other + (1 - w) * base */
void ck_nearswap(const float *restrict base, const float *restrict other, float t,
                 float *restrict out, int64_t n) {
    const float floor = 1e-6f;
    for (int64_t j = 0; j < n; j++) {
        float distance = __builtin_fabsf(base[j] - other[j]);
        distance = distance > floor ? distance : floor;
        float w = (1.0f / distance) * t;
        w = w > 0.0f ? w : 0.0f;
        w = w < 1.0f ? w : 1.0f;
        out[j] = w * other[j] + (1.0f - w) * base[j];
    }
}

/* A linear combination (mergeops.ops.gram.linear_combination):
 *   out = ((v_0 * c_0 + v_1 * c_1) + ...) [+ base], v_t = x_t - base when x_are_models else x_t
 * (the first product is the start: no +0 before it). */
void ck_linear_combination(const float *restrict base, const float *const *x, int32_t count,
                           int32_t x_are_models, const float *restrict c, float *restrict out,
                           int64_t n) {
    float total[512];
    for (int64_t start = 0; start < n; start += 512) {
        int64_t len = n - start < 512 ? n - start : 512;
        const float *b = base ? base + start : 0;
        for (int32_t t = 0; t < count; t++) {
            const float *xt = x[t] + start;
            float ct = c[t];
            if (x_are_models) {
                if (t == 0)
                    for (int64_t j = 0; j < len; j++) total[j] = (xt[j] - b[j]) * ct;
                else
                    for (int64_t j = 0; j < len; j++) total[j] = total[j] + (xt[j] - b[j]) * ct;
            } else {
                if (t == 0)
                    for (int64_t j = 0; j < len; j++) total[j] = xt[j] * ct;
                else
                    for (int64_t j = 0; j < len; j++) total[j] = total[j] + xt[j] * ct;
            }
        }
        float *o = out + start;
        if (b)
            for (int64_t j = 0; j < len; j++) o[j] = total[j] + b[j];
        else
            for (int64_t j = 0; j < len; j++) o[j] = total[j];
    }
}

#define GRAM_MAX 16 /* inputs of one Gram */

/* The lane sums of a Gram matrix (mergeops.ops.gram.LaneGram): for every pair i <= j of the
 * inputs, in row-major order p, lanes[8 p + k] += v_i * v_j over the entries of lane k (entry
 * index mod 8), each lane in index order; v_t = x_t - base (float32) when x_are_models, else
 * x_t, and the product is taken in double (exact for float32 values).
 *
 * The entries go by chunks of GRAM_CHUNK: the task vectors of a chunk are staged once, then
 * each pair runs over the whole chunk with its eight lanes held in registers. Every lane still
 * adds its entries in index order, so the sums are those of one pass entry by entry. */
#define GRAM_CHUNK 512 /* entries per chunk, a multiple of 8 (staging: 32 KiB for 16 inputs) */

void ck_gram_lanes(const float *base, const float *const *x, int32_t count, int32_t x_are_models,
                   double *restrict lanes, int64_t n) {
    float stage[GRAM_MAX][GRAM_CHUNK];
    const float *v[GRAM_MAX];
    for (int64_t start = 0; start < n; start += GRAM_CHUNK) {
        const int64_t len = n - start < GRAM_CHUNK ? n - start : GRAM_CHUNK;
        const int64_t whole = len - len % 8;
        for (int32_t i = 0; i < count; i++) {
            v[i] = x[i] + start;
            if (x_are_models) {
                const float *b = base + start;
                for (int64_t k = 0; k < len; k++) stage[i][k] = v[i][k] - b[k];
                v[i] = stage[i];
            }
        }
        double *lane = lanes;
        for (int32_t i = 0; i < count; i++)
            for (int32_t j = i; j < count; j++, lane += 8) {
                const float *a = v[i], *b = v[j];
                double acc[8];
                for (int32_t k = 0; k < 8; k++) acc[k] = lane[k];
                for (int64_t e = 0; e < whole; e += 8)
                    for (int32_t k = 0; k < 8; k++)
                        acc[k] = acc[k] + (double)a[e + k] * (double)b[e + k];
                for (int64_t e = whole; e < len; e++)
                    acc[e - whole] = acc[e - whole] + (double)a[e] * (double)b[e];
                for (int32_t k = 0; k < 8; k++) lane[k] = acc[k];
            }
    }
}

/* nuslerp's spherical step with one angle for the tensor (mergeops.ops.spherical.nuslerp_apply):
 *   out = (sin_a * a + sin_b * b) / sin_theta */
void ck_nuslerp_apply(const float *restrict a, const float *restrict b, float sin_a, float sin_b,
                      float sin_theta, float *restrict out, int64_t n) {
    for (int64_t j = 0; j < n; j++) out[j] = (sin_a * a[j] + sin_b * b[j]) / sin_theta;
}
