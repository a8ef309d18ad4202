/* DELLA's keep probabilities from the ranks of magnitudes within each row, by a stable LSD
 * radix sort (mergeops.ops.prune.della_keep_probability).
 *
 * A non-negative float32 orders as its bit pattern does, so |x| is ranked by the 31 bits below
 * the sign (-0.0 and +0.0 are equal). Each row's (key, index) pairs, packed in one 64-bit word,
 * are sorted by the key's four bytes, lowest first, each pass stable; a pass is skipped where
 * every key has the same byte. Equal magnitudes therefore keep their index order. The entry at
 * 0-based position k then gets p = low + ((k / (cols - 1)) * 2) * eps, each step rounded to
 * float32 as torch rounds it (no fused multiply-add: see FLAGS in __init__.py).
 */
#include <stdint.h>

#define BYTES 4
#define BINS 256

/* Rows `rows` of `cols` (2 to 2^24 - 1) float32 values in `x` to probabilities in `out`;
 * `a` and `b` are `cols` words of scratch each. */
void ck_della_probabilities(const float *x, int64_t rows, int64_t cols, float low, float eps,
                            uint64_t *a, uint64_t *b, float *out) {
    const float span = (float)(cols - 1);
    uint32_t counts[BYTES][BINS];
    for (int64_t r = 0; r < rows; r++) {
        const uint32_t *row = (const uint32_t *)(x + r * cols);
        for (int32_t d = 0; d < BYTES; d++)
            for (int32_t i = 0; i < BINS; i++) counts[d][i] = 0;
        for (int64_t i = 0; i < cols; i++) {
            uint32_t key = row[i] & 0x7fffffffu;
            a[i] = ((uint64_t)key << 32) | (uint64_t)i;
            counts[0][key & 255]++;
            counts[1][(key >> 8) & 255]++;
            counts[2][(key >> 16) & 255]++;
            counts[3][key >> 24]++;
        }
        uint64_t *from = a, *to = b;
        for (int32_t d = 0; d < BYTES; d++) {
            uint32_t *next = counts[d];
            const int32_t shift = 32 + 8 * d;
            if (next[(from[0] >> shift) & 255] == (uint32_t)cols) continue; /* one byte value */
            uint32_t seen = 0;
            for (int32_t i = 0; i < BINS; i++) {
                uint32_t count = next[i];
                next[i] = seen;
                seen += count;
            }
            for (int64_t i = 0; i < cols; i++) {
                uint64_t word = from[i];
                to[next[(word >> shift) & 255]++] = word;
            }
            uint64_t *swap = from;
            from = to;
            to = swap;
        }
        float *probs = out + r * cols;
        for (int64_t k = 0; k < cols; k++)
            probs[(uint32_t)from[k]] = low + (((float)k / span) * 2.0f) * eps;
    }
}
