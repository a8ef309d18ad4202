/* Fused task-vector combines for float32 on the CPU: one pass over the inputs instead of one
 * torch op per model and step. Each element sees exactly the operations of the torch reference
 * (mergeops.ops.sign_consensus.stacked_combine), in the same order and with the same rounding:
 * built with -ffp-contract=off and without fast-math, so no product is fused into a sum and no
 * sum is reordered; vectorising runs the same sequence on several elements at once.
 *
 * No headers beyond the compiler's own and no libc calls: the library links without a C
 * library's development files. Every inner loop is a function of restrict pointers, so the
 * compiler vectorises it without run-time alias checks.
 */
#include <stddef.h>
#include <stdint.h>

#define BLOCK 512 /* elements per inner block: every term's block stays in L1 */

static __attribute__((noinline)) void fill(float *restrict a, float value, int64_t len) {
    for (int64_t j = 0; j < len; j++) a[j] = value;
}

/* total += (x - base) * w, or total += x * w (x a task vector) */
static __attribute__((noinline)) void add_weighted(float *restrict total, const float *restrict x,
                         const float *restrict base, float w, int32_t x_is_model, int64_t len) {
    if (x_is_model) {
        for (int64_t j = 0; j < len; j++) {
            float tau = x[j] - base[j];
            float delta = tau * w;
            total[j] = total[j] + delta;
        }
    } else {
        for (int64_t j = 0; j < len; j++) {
            float delta = x[j] * w;
            total[j] = total[j] + delta;
        }
    }
}

/* merged = (merged [/ divisor]) [* scale], the divisor one value or (`divisors`) one per
 * element, where a zero divisor becomes 1 (+ (divisor == 0)) */
static __attribute__((noinline)) void scale_by(float *restrict merged,
                                               const float *restrict divisors, int32_t normalize,
                                               float divisor, int32_t do_scale, float scale,
                                               int64_t len) {
    if (normalize && divisors) {
        for (int64_t j = 0; j < len; j++)
            merged[j] = merged[j] / (divisors[j] + (float)(divisors[j] == 0.0f));
    } else if (normalize) {
        for (int64_t j = 0; j < len; j++) merged[j] = merged[j] / divisor;
    }
    if (do_scale)
        for (int64_t j = 0; j < len; j++) merged[j] = merged[j] * scale;
}

/* out = base + merged, or merged when there is no base */
static __attribute__((noinline)) void finish(float *restrict out, const float *restrict base,
                                             const float *restrict merged, int64_t len) {
    if (base) {
        for (int64_t j = 0; j < len; j++) out[j] = base[j] + merged[j];
    } else {
        for (int64_t j = 0; j < len; j++) out[j] = merged[j];
    }
}

/* out = base + scale * (sum_t w[t] * tau_t) [/ divisor], where tau_t = x[t] - base when
 * `x_are_models`, else x[t]; with no base (NULL, x not models), out = that sum [/ divisor]
 * [* scale] (linear). The sum starts from +0 and adds the terms in model order. */
void ck_weighted_sum(const float *base, const float *const *x, int32_t count,
                     int32_t x_are_models, const float *w, int32_t normalize, float divisor,
                     int32_t do_scale, float scale, float *out, int64_t n) {
    float total[BLOCK];
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t len = n - start < BLOCK ? n - start : BLOCK;
        fill(total, 0.0f, len);
        for (int32_t t = 0; t < count; t++)
            add_weighted(total, x[t] + start, base ? base + start : NULL, w[t], x_are_models,
                         len);
        scale_by(total, NULL, normalize, divisor, do_scale, scale, len);
        finish(out + start, base ? base + start : NULL, total, len);
    }
}

/* kept += delta where sign(delta) == elected, weight += w there; delta = x * w.
 * sign(delta) == elected <=> delta * elected > 0 (exact: elected is +-1; a zero delta never
 * agrees). delta * 0 is +-0, and kept (a sum from +0) is never -0, so adding +-0 leaves it as
 * it is, exactly as skipping the term does; the same for weight. */
static __attribute__((noinline)) void add_agreeing(float *restrict kept, float *restrict weight,
                         const float *restrict x, const float *restrict elected, float w,
                         int64_t len) {
    for (int64_t j = 0; j < len; j++) {
        float delta = x[j] * w;
        float agree = (float)(delta * elected[j] > 0.0f);
        kept[j] = kept[j] + delta * agree;
        weight[j] = weight[j] + w * agree;
    }
}

/* elected = +1 where total >= 0, else -1 */
static __attribute__((noinline)) void elect(float *restrict elected, const float *restrict total, int64_t len) {
    for (int64_t j = 0; j < len; j++) elected[j] = total[j] >= 0.0f ? 1.0f : -1.0f;
}

/* TIES's disjoint merge: delta_t = tau_t * w[t]; the elected sign is + where the sum of all
 * delta_t is >= 0, else -; kept = the sum of the delta_t of that sign, divided (`normalize`)
 * by the sum of their w[t] (a zero divisor becomes 1), scaled, added to base. Every sum starts
 * from +0 and adds in model order. */
void ck_consensus_sum(const float *base, const float *const *tau, int32_t count,
                      const float *w, int32_t normalize, int32_t do_scale, float scale,
                      float *out, int64_t n) {
    float total[BLOCK], elected[BLOCK], kept[BLOCK], weight[BLOCK];
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t len = n - start < BLOCK ? n - start : BLOCK;
        fill(total, 0.0f, len);
        for (int32_t t = 0; t < count; t++)
            add_weighted(total, tau[t] + start, base + start, w[t], 0, len);
        elect(elected, total, len);
        fill(kept, 0.0f, len);
        fill(weight, 0.0f, len);
        for (int32_t t = 0; t < count; t++)
            add_agreeing(kept, weight, tau[t] + start, elected, w[t], len);
        scale_by(kept, weight, normalize, 1.0f, do_scale, scale, len);
        finish(out + start, base + start, kept, len);
    }
}

/* counts[k] += the number of values whose key is k, where a value's key is 2*high + (low != 0)
 * for its bits = high * 2^16 + low (non-negative float32 magnitudes: keys below 2^16). The
 * first sweep of the rank selection (mergeops.ops.select.RankCounter), in one pass instead of
 * an add, two shifts, an add and a bincount. Returns 0 when a value is negative (its sign bit
 * set; not counted), else 1. */
int32_t ck_key_counts(const uint32_t *restrict bits, int64_t n, int64_t *restrict counts) {
    int32_t ok = 1;
    for (int64_t j = 0; j < n; j++) {
        uint32_t u = bits[j];
        if (u >> 31) {
            ok = 0;
            continue;
        }
        counts[(u >> 16) * 2 + ((u & 0xFFFFu) != 0)] += 1;
    }
    return ok;
}

/* The same counts as ck_key_counts, of the magnitudes |x - base| (float32 x and base): the
 * task vector's difference and magnitude taken per element (the bits of torch's sub and abs)
 * instead of written out first. */
void ck_tau_key_counts(const float *restrict x, const float *restrict base, int64_t n,
                       int64_t *restrict counts) {
    for (int64_t j = 0; j < n; j++) {
        float tau = x[j] - base[j];
        uint32_t u;
        __builtin_memcpy(&u, &tau, sizeof u);
        u &= 0x7FFFFFFFu;
        counts[(u >> 16) * 2 + ((u & 0xFFFFu) != 0)] += 1;
    }
}

/* x = (x - base) * keep, keep 1 or 0: TIES's trim of one model's slice, in place. An entry is
 * kept when |x - base| > threshold (>= when `inclusive`), or when it equals the threshold while
 * *quota > 0 (each one taken, in flat order, lowers *quota). The products are the torch path's
 * (tau * 1.0 or tau * 0.0, so a dropped negative entry is -0). */
void ck_trim(float *restrict x, const float *restrict base, float threshold, int32_t inclusive,
             int64_t *quota, int64_t n) {
    int64_t j = 0, left = *quota;
    for (; j < n && left > 0; j++) { /* in order while ties may still be taken */
        float tau = x[j] - base[j];
        float mag = __builtin_fabsf(tau);
        int keep = inclusive ? mag >= threshold : mag > threshold;
        if (!keep && mag == threshold) {
            keep = 1;
            left--;
        }
        x[j] = tau * (keep ? 1.0f : 0.0f);
    }
    *quota = left;
    if (inclusive) {
        for (; j < n; j++) {
            float tau = x[j] - base[j];
            x[j] = tau * (float)(__builtin_fabsf(tau) >= threshold);
        }
    } else {
        for (; j < n; j++) {
            float tau = x[j] - base[j];
            x[j] = tau * (float)(__builtin_fabsf(tau) > threshold);
        }
    }
}

/* x = (x - base) * keep: breadcrumbs' rank window of one model's slice, in place. An entry is
 * kept when low < |x - base| < high, or when |x - base| equals values[r] (r < 2) and the
 * entry's ordinal among the entries equal to it (0-based, counted across slices in seen[r])
 * lies in [first[r], last[r]); seen[] is advanced by the entries met. A run that is not there
 * has a NaN value, which nothing equals. Blocks where no run starts or ends are done in one
 * vector loop; the few where one does, one entry at a time. The products are the torch path's
 * (tau * 1.0 or tau * 0.0, so a dropped negative entry is -0). */
void ck_window_trim(float *restrict x, const float *restrict base, float low, float high,
                    const float *values, const int64_t *first, const int64_t *last,
                    int64_t *seen, int64_t n) {
    const float v0 = values[0], v1 = values[1];
    const int64_t f0 = first[0], l0 = last[0], f1 = first[1], l1 = last[1];
    int64_t s0 = seen[0], s1 = seen[1];
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t len = n - start < BLOCK ? n - start : BLOCK;
        float *restrict xb = x + start;
        const float *restrict bb = base + start;
        int64_t c0 = 0, c1 = 0;
        for (int64_t j = 0; j < len; j++) {
            float mag = __builtin_fabsf(xb[j] - bb[j]);
            c0 += mag == v0;
            c1 += mag == v1;
        }
        /* 1: every equal entry here is in its run, 0: none is, -1: the run starts or ends here */
        const int in0 = (s0 >= f0 && s0 + c0 <= l0) ? 1 : (s0 + c0 <= f0 || s0 >= l0) ? 0 : -1;
        const int in1 = (s1 >= f1 && s1 + c1 <= l1) ? 1 : (s1 + c1 <= f1 || s1 >= l1) ? 0 : -1;
        if (in0 >= 0 && in1 >= 0) {
            const float k0 = (float)in0, k1 = (float)in1;
            for (int64_t j = 0; j < len; j++) {
                float tau = xb[j] - bb[j];
                float mag = __builtin_fabsf(tau);
                float keep = (float)((mag > low) & (mag < high));
                keep = mag == v0 ? k0 : keep;
                keep = mag == v1 ? k1 : keep;
                xb[j] = tau * keep;
            }
            s0 += c0;
            s1 += c1;
            continue;
        }
        for (int64_t j = 0; j < len; j++) {
            float tau = xb[j] - bb[j];
            float mag = __builtin_fabsf(tau);
            int keep = mag > low && mag < high;
            if (mag == v0) {
                keep = s0 >= f0 && s0 < l0;
                s0++;
            } else if (mag == v1) {
                keep = s1 >= f1 && s1 < l1;
                s1++;
            }
            xb[j] = tau * (keep ? 1.0f : 0.0f);
        }
    }
    seen[0] = s0;
    seen[1] = s1;
}
