/* Input slices cast to float32 and checked finite in one pass (mergeops.slice_reads), instead
 * of a torch copy and a torch sum over the copy: the reader threads run them beside the merge,
 * and torch's ops there start an OpenMP team of their own per call.
 *
 * bfloat16 -> float32 is exact (the 16 bits are the float32's high half); float32 is copied.
 * A value is NaN or Inf when its exponent bits are all ones.
 */
#include <stdint.h>

/* dst = src (bfloat16 bits) as float32; returns how many are NaN or Inf */
int64_t ck_cast_bf16(const uint16_t *restrict src, uint32_t *restrict dst, int64_t n) {
    int64_t bad = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t bits = (uint32_t)src[j] << 16;
        dst[j] = bits;
        bad += (bits & 0x7f800000u) == 0x7f800000u;
    }
    return bad;
}

/* dst = src (float32 bits); returns how many are NaN or Inf */
int64_t ck_copy_f32(const uint32_t *restrict src, uint32_t *restrict dst, int64_t n) {
    int64_t bad = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t bits = src[j];
        dst[j] = bits;
        bad += (bits & 0x7f800000u) == 0x7f800000u;
    }
    return bad;
}

/* dst = src (float32 bits) rounded to bfloat16, to nearest even as torch rounds, a NaN as
 * bfloat16's quiet NaN; returns how many results are NaN or Inf (a float32 beyond bfloat16's
 * range rounds to Inf). */
int64_t ck_round_bf16(const uint32_t *restrict src, uint16_t *restrict dst, int64_t n) {
    int64_t bad = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t bits = src[j];
        uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
        uint32_t nan = (bits & 0x7fffffffu) > 0x7f800000u;
        rounded = nan ? 0x7fc0u : rounded; /* the rounding would carry a NaN into anything */
        bad += ((bits & 0x7f800000u) == 0x7f800000u) | ((rounded & 0x7f80u) == 0x7f80u);
        dst[j] = (uint16_t)rounded;
    }
    return bad;
}

/* dst = src (bfloat16 bits, copied); returns how many are NaN or Inf */
int64_t ck_copy_bf16(const uint16_t *restrict src, uint16_t *restrict dst, int64_t n) {
    int64_t bad = 0;
    for (int64_t j = 0; j < n; j++) {
        uint16_t bits = src[j];
        dst[j] = bits;
        bad += (bits & 0x7f80u) == 0x7f80u;
    }
    return bad;
}
