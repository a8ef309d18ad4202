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
