/* Exact order statistics of float32 values by radix selection: the values at given ranks of
 * the ascending order, in two passes over the values and no copy of them (arcee_fusion's
 * quartiles, mergeops.ops.fusion.quartiles_in_place).
 *
 * Each value maps to a 32-bit key that orders as the value does: the bits with the sign bit
 * flipped for non-negative values, all bits flipped for negative ones (-0.0 counts as +0.0,
 * equal to it). Pass 1 counts the keys' high 16 bits; the bin holding each rank follows from
 * the running counts. Pass 2 counts the low 16 bits of the values in those bins only; the
 * rank's low bits follow the same way, and the key is the value.
 */
#include <stdint.h>

#define BINS 65536
#define MAX_RANKS 4

static inline uint32_t key_of(float value) {
    union {
        float f;
        uint32_t u;
    } v = {value};
    uint32_t u = v.u == 0x80000000u ? 0u : v.u;               /* -0.0 as +0.0 */
    uint32_t flip = (uint32_t)((int32_t)u >> 31) | 0x80000000u; /* no branch on the sign */
    return u ^ flip;
}

/* NaN keys lie above +inf's key or below -inf's */
static inline int64_t is_nan(uint32_t key) { return (key > 0xff800000u) | (key < 0x007fffffu); }

static inline float value_of(uint32_t key) {
    union {
        float f;
        uint32_t u;
    } v;
    v.u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
    return v.f;
}

/* The bin of `counts` (BINS entries) holding 0-based `rank`, and the rank within it. */
static int32_t bin_of(const int64_t *counts, int64_t rank, int64_t *within) {
    int64_t seen = 0;
    for (int32_t b = 0; b < BINS; b++) {
        if (rank < seen + counts[b]) {
            *within = rank - seen;
            return b;
        }
        seen += counts[b];
    }
    *within = 0;
    return -1;
}

#define WAYS 4                  /* interleaved count tables: no chain of increments to one bin */
#define FLUSH ((int64_t)1 << 28) /* entries between flushes of the 32-bit counts */

/* counts[b] += how many of values[0..n) have key >> 16 == b (way 0 of `ways`: WAYS * BINS
 * uint32); NaNs counted into *nans. */
static void count_high(const float *values, int64_t n, uint32_t *ways, int64_t *counts,
                       int64_t *nans) {
    int64_t found = 0;
    for (int64_t start = 0; start < n; start += FLUSH) {
        int64_t stop = n - start < FLUSH ? n : start + FLUSH;
        for (int64_t b = 0; b < (int64_t)WAYS * BINS; b++) ways[b] = 0;
        int64_t j = start;
        for (; j + WAYS <= stop; j += WAYS)
            for (int32_t w = 0; w < WAYS; w++) {
                uint32_t key = key_of(values[j + w]);
                found += is_nan(key);
                ways[(int64_t)w * BINS + (key >> 16)]++;
            }
        for (; j < stop; j++) {
            uint32_t key = key_of(values[j]);
            found += is_nan(key);
            ways[key >> 16]++;
        }
        for (int32_t b = 0; b < BINS; b++)
            for (int32_t w = 0; w < WAYS; w++) counts[b] += ways[(int64_t)w * BINS + b];
    }
    *nans = found;
}

/* out[i] = the value of 0-based rank ranks[i] in the ascending order of values[0..n)
 * (count <= 4 ranks, each < n). `scratch`: (1 + count) * BINS int64 plus WAYS * BINS / 2
 * int64 (the 32-bit count tables). Returns 0, or 1 (nothing written) when a value is NaN or a
 * rank is out of range. */
int32_t ck_select_ranks(const float *values, int64_t n, const int64_t *ranks, int32_t count,
                        int64_t *scratch, float *out) {
    if (count < 1 || count > MAX_RANKS) return 1;
    for (int32_t i = 0; i < count; i++)
        if (ranks[i] < 0 || ranks[i] >= n) return 1;
    int64_t *high = scratch;
    int64_t *low = scratch + BINS;
    uint32_t *ways = (uint32_t *)(scratch + (int64_t)(1 + count) * BINS);
    for (int32_t b = 0; b < BINS; b++) high[b] = 0;
    int64_t nans = 0;
    count_high(values, n, ways, high, &nans);
    if (nans) return 1;
    int32_t bins[MAX_RANKS];
    int64_t within[MAX_RANKS];
    for (int32_t i = 0; i < count; i++) bins[i] = bin_of(high, ranks[i], &within[i]);
    /* slot[b]: which low-bits table counts high bin b (-1: none); equal bins share one */
    int8_t *slot = (int8_t *)ways; /* the count tables are free again */
    for (int32_t b = 0; b < BINS; b++) slot[b] = -1;
    for (int32_t i = count - 1; i >= 0; i--) slot[bins[i]] = (int8_t)i;
    for (int64_t b = 0; b < (int64_t)count * BINS; b++) low[b] = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t key = key_of(values[j]);
        int32_t table = slot[key >> 16];
        if (table >= 0) low[(int64_t)table * BINS + (key & 0xffffu)]++;
    }
    for (int32_t i = 0; i < count; i++) {
        int64_t unused;
        int32_t lowbits = bin_of(low + (int64_t)slot[bins[i]] * BINS, within[i], &unused);
        out[i] = value_of(((uint32_t)bins[i] << 16) | (uint32_t)lowbits);
    }
    return 0;
}
