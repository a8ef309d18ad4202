/* RAM and RAM+ (Reinforced Agent Merging, https://arxiv.org/abs/2601.13572) for float32 on the
 * CPU, one pass over the inputs instead of a dozen torch ops on stacked (T, n) temporaries.
 *
 * Each element sees the operations of the torch reference (mergeops.ops.ram) in its order and
 * rounding (built with -ffp-contract=off, no fast-math):
 *   tau_t  = x_t - base                    moved_t = |tau_t| > eps (float32 compare)
 *   m      = sum of moved_t                kept_t  = tau_t * moved_t
 *   term_t = (kept_t * [m == 1]) * scale_t + (kept_t * [m > 1]) / max(m, 1)
 *   out    = base + (((+0 + term_0) + term_1) + ...)
 * scale_t is 1 for ram (a product by 1 changes no bit, signed zeros included). Mover counts
 * are held as floats: exact for any number of models a merge takes.
 */
#include <stdint.h>

#define RAM_BLOCK 512 /* elements per inner block: the block's counts and sums stay in L1 */

/* movers = [first ? 0 : movers] + (|x - base| > eps) */
static __attribute__((noinline)) void count_movers(float *restrict movers, const float *restrict x,
                                                   const float *restrict base, float eps,
                                                   int32_t first, int64_t len) {
    for (int64_t j = 0; j < len; j++) {
        float moved = (float)(__builtin_fabsf(x[j] - base[j]) > eps);
        movers[j] = first ? moved : movers[j] + moved;
    }
}

/* total += term_t of model x */
static __attribute__((noinline)) void add_term(float *restrict total, const float *restrict x,
                                               const float *restrict base,
                                               const float *restrict movers, float eps,
                                               float scale, int64_t len) {
    for (int64_t j = 0; j < len; j++) {
        float tau = x[j] - base[j];
        float kept = tau * (float)(__builtin_fabsf(tau) > eps);
        float m = movers[j];
        float unique = (kept * (float)(m == 1.0f)) * scale;
        float shared = (kept * (float)(m > 1.0f)) / (m > 1.0f ? m : 1.0f);
        total[j] = total[j] + (unique + shared);
    }
}

/* out = base + total */
static __attribute__((noinline)) void add_base(float *restrict out, const float *restrict base,
                                               const float *restrict total, int64_t len) {
    for (int64_t j = 0; j < len; j++) out[j] = base[j] + total[j];
}

/* RAM's merge of `count` models; `scale` (one per model) for RAM+, NULL for plain RAM. */
void ck_ram(const float *base, const float *const *x, int32_t count, float eps,
            const float *scale, float *out, int64_t n) {
    float movers[RAM_BLOCK], total[RAM_BLOCK];
    for (int64_t start = 0; start < n; start += RAM_BLOCK) {
        int64_t len = n - start < RAM_BLOCK ? n - start : RAM_BLOCK;
        for (int32_t t = 0; t < count; t++)
            count_movers(movers, x[t] + start, base + start, eps, t == 0, len);
        for (int64_t j = 0; j < len; j++) total[j] = 0.0f;
        for (int32_t t = 0; t < count; t++)
            add_term(total, x[t] + start, base + start, movers, eps, scale ? scale[t] : 1.0f,
                     len);
        add_base(out + start, base + start, total, len);
    }
}

/* shared[t] += how many entries model t moved together with another model, unique[t] += how
 * many it moved alone (RAM+'s counts of mergeops.ops.ram.mover_counts). */
void ck_ram_counts(const float *base, const float *const *x, int32_t count, float eps,
                   int64_t *shared, int64_t *unique, int64_t n) {
    float movers[RAM_BLOCK];
    for (int64_t start = 0; start < n; start += RAM_BLOCK) {
        int64_t len = n - start < RAM_BLOCK ? n - start : RAM_BLOCK;
        for (int32_t t = 0; t < count; t++)
            count_movers(movers, x[t] + start, base + start, eps, t == 0, len);
        for (int32_t t = 0; t < count; t++) {
            const float *xt = x[t] + start, *b = base + start;
            int32_t alone = 0, together = 0;
            for (int64_t j = 0; j < len; j++) {
                int32_t moved = __builtin_fabsf(xt[j] - b[j]) > eps;
                alone += moved & (movers[j] == 1.0f);
                together += moved & (movers[j] > 1.0f);
            }
            unique[t] += alone;
            shared[t] += together;
        }
    }
}
