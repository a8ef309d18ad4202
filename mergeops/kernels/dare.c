/* DARE with the L1 rescale (mergeops.methods.task_vector.dare) for float32 on the CPU.
 *
 * The L1 factor of model t is sum|tau| / sum|tau * keep| over the whole tensor. Both sums are
 * "lane sums": entry i is added, as a double, to lane i mod 8, each lane in index order from
 * +0 (the torch reference: mergeops.ops.lanes.lane_cumsum, a cumsum down rows of 8). The result
 * depends neither on how the tensor is cut into slices (slices start at multiples of 8) nor on
 * the thread count. Built with -ffp-contract=off, no fast-math: every sum and product rounds
 * as the reference's.
 *
 * Keep masks are packed 8 entries a byte, the first entry in the most significant bit
 * (mergeops.ops.masks.pack_mask), zero-padded at the end of the tensor.
 */
#include <stdint.h>

#define LANES 8

/* lanes[i % 8] += |model - base|, lanes[8 + i % 8] += |model - base| * keep with
 * keep = uniform < density; bits (from entry 0, n need not be a multiple of 8) = keep. */
/* One entry of ck_dare_sweep into lane k: returns its keep bit. */
static inline uint32_t sweep_entry(float model, float base, float uniform, float density,
                                   double *before, double *after) {
    float magnitude = __builtin_fabsf(model - base);
    int32_t keep = uniform < density;
    *before = *before + (double)magnitude;
    *after = *after + (double)(magnitude * (float)keep);
    return (uint32_t)keep;
}

void ck_dare_sweep(const float *restrict model, const float *restrict base,
                   const float *restrict uniform, float density, uint8_t *restrict bits,
                   double *restrict lanes, int64_t n) {
    double before[LANES], after[LANES];
    for (int k = 0; k < LANES; k++) {
        before[k] = lanes[k];
        after[k] = lanes[LANES + k];
    }
    for (int64_t start = 0; start < n; start += LANES) {
        int64_t len = n - start < LANES ? n - start : LANES; /* short only at the end */
        uint32_t byte = 0;
        for (int k = 0; k < len; k++) {
            int64_t j = start + k;
            byte |= sweep_entry(model[j], base[j], uniform[j], density, &before[k], &after[k])
                    << (7 - k);
        }
        bits[start / LANES] = (uint8_t)byte;
    }
    for (int k = 0; k < LANES; k++) {
        lanes[k] = before[k];
        lanes[LANES + k] = after[k];
    }
}

/* lanes[i % 8] += values[i] as doubles, each lane in index order. */
void ck_lane_sums(const float *restrict values, double *restrict lanes, int64_t n) {
    double sums[LANES];
    for (int k = 0; k < LANES; k++) sums[k] = lanes[k];
    int64_t whole = n - n % LANES;
    for (int64_t start = 0; start < whole; start += LANES)
        for (int k = 0; k < LANES; k++) sums[k] = sums[k] + (double)values[start + k];
    for (int64_t j = whole; j < n; j++) sums[j - whole] = sums[j - whole] + (double)values[j];
    for (int k = 0; k < LANES; k++) lanes[k] = sums[k];
}

/* x = ((x - base) * keep) * scale, keep the packed bit of entry offset + i (offset a multiple
 * of 8): DARE's masked, rescaled task vector of a slice in place, the bits of
 * (model - base).mul_(keep).mul_(scale). */
void ck_dare_apply(float *restrict x, const float *restrict base, const uint8_t *restrict bits,
                   float scale, int64_t n) {
    int64_t whole = n - n % LANES;
    for (int64_t start = 0; start < whole; start += LANES) {
        uint32_t byte = bits[start / LANES];
        for (int k = 0; k < LANES; k++) {
            float keep = (float)((byte >> (7 - k)) & 1u);
            x[start + k] = ((x[start + k] - base[start + k]) * keep) * scale;
        }
    }
    for (int64_t j = whole; j < n; j++) {
        float keep = (float)((bits[j >> 3] >> (7 - (j & 7))) & 1);
        x[j] = ((x[j] - base[j]) * keep) * scale;
    }
}
