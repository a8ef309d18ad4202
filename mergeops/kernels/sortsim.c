/* Which entries an unstable torch.sort puts at given positions, without sorting everything.
 *
 * mergekit keeps `argsort(|tau|, descending=True)[:k]` (TIES) or `sort(|tau|).indices[lo:hi]`
 * (breadcrumbs). Where a group of equal magnitudes straddles a cut, which of them are kept is
 * decided by the sort algorithm alone. On the CPU, torch sorts a float32 tensor with the C++
 * library's introsort (libstdc++ std::sort) over (value, index) pairs, comparing values only.
 * This file runs that same algorithm step for step -- median-of-three pivot moved to the
 * front, unguarded Hoare partition, depth limit 2*floor(log2 n), ranges of 16 or fewer left to
 * a final insertion sort -- but descends only into the ranges that contain a wanted position:
 * a range outside every window never moves an entry into one, so it is left unsorted. The
 * entries that end at the windows' positions are those torch.sort leaves there; everything
 * else is in no particular order. Tested against torch.sort itself (tests/mergeops).
 *
 * The final insertion sort only ever moves an entry within the small range the partitions
 * left it in, so it is done per small range that meets a window (a stable insertion sort).
 * Should a wanted range run out of depth (where std::sort switches to heapsort; not seen on
 * real magnitudes), the call reports it and the caller runs the whole torch.sort instead.
 *
 * Comparisons are on floats only: keys holding a NaN are refused (left untouched) before
 * anything moves. The index array is filled here (0, 1, ...) in the same call.
 */
#include <stdint.h>

#define THRESHOLD 16
#define MAX_WINDOWS 4

typedef struct {
    float *v;
    int64_t *ix;
    int32_t descending;
    int32_t windows;
    int64_t first[MAX_WINDOWS], last[MAX_WINDOWS];
} Sim;

static inline int before(const Sim *s, float a, float b) { return s->descending ? a > b : a < b; }

static inline void swap(Sim *s, int64_t i, int64_t j) {
    float t = s->v[i];
    s->v[i] = s->v[j];
    s->v[j] = t;
    int64_t u = s->ix[i];
    s->ix[i] = s->ix[j];
    s->ix[j] = u;
}

static int wanted(const Sim *s, int64_t first, int64_t last) {
    for (int32_t w = 0; w < s->windows; w++)
        if (first < s->last[w] && s->first[w] < last) return 1;
    return 0;
}

static void move_median_to_first(Sim *s, int64_t result, int64_t a, int64_t b, int64_t c) {
    const float *v = s->v;
    if (before(s, v[a], v[b])) {
        if (before(s, v[b], v[c])) swap(s, result, b);
        else if (before(s, v[a], v[c])) swap(s, result, c);
        else swap(s, result, a);
    } else if (before(s, v[a], v[c])) swap(s, result, a);
    else if (before(s, v[b], v[c])) swap(s, result, c);
    else swap(s, result, b);
}

/* Where the scans of unguarded_partition stop, a block of BLOCK entries at a time: the
 * offsets of the entries not before the pivot (left) or that the pivot is not before
 * (right), written without a branch per entry. */
#define BLOCK 128

static int left_stops(const Sim *s, const float *v, float p, int32_t *out) {
    int n = 0;
    if (s->descending)
        for (int i = 0; i < BLOCK; i++) { out[n] = i; n += !(v[i] > p); }
    else
        for (int i = 0; i < BLOCK; i++) { out[n] = i; n += !(v[i] < p); }
    return n;
}

static int right_stops(const Sim *s, const float *end, float p, int32_t *out) {
    int n = 0; /* offsets back from end[-1] */
    if (s->descending)
        for (int i = 0; i < BLOCK; i++) { out[n] = i; n += !(p > end[-1 - i]); }
    else
        for (int i = 0; i < BLOCK; i++) { out[n] = i; n += !(p < end[-1 - i]); }
    return n;
}

/* std::__unguarded_partition, step for step in its result. Its k-th swap exchanges the k-th
 * entry its left scan stops at with the k-th its right scan stops at, as long as the two have
 * not crossed; an entry is read before any swap touches it. So while a stretch of at least
 * two blocks is left unscanned between the two sides, both sides' stops are collected a block
 * at a time (no branch per entry; most of the time on random keys went to mispredicted scan
 * branches) and swapped in pairs, in order. The rest runs the plain loop from the state it
 * would have reached after those same swaps: `first` one past the last left stop swapped,
 * `last` at the last right stop swapped. */
static int64_t unguarded_partition(Sim *s, int64_t first, int64_t last, int64_t pivot) {
    const float p = s->v[pivot]; /* the pivot stays at `pivot` (outside [first, last)) */
    int32_t lstop[BLOCK], rstop[BLOCK];
    int lnext = 0, lleft = 0, rnext = 0, rleft = 0;
    int64_t lo = first, hi = last, lbase = first, rend = last; /* unscanned: [lo, hi) */
    while (hi - lo >= 2 * BLOCK) {
        if (lleft == 0) {
            lbase = lo;
            lnext = 0;
            lleft = left_stops(s, s->v + lo, p, lstop);
            lo += BLOCK;
        }
        if (rleft == 0) {
            rend = hi;
            rnext = 0;
            rleft = right_stops(s, s->v + hi, p, rstop);
            hi -= BLOCK;
        }
        int pairs = lleft < rleft ? lleft : rleft;
        if (pairs == 0) continue;
        for (int k = 0; k < pairs; k++)
            swap(s, lbase + lstop[lnext + k], rend - 1 - rstop[rnext + k]);
        first = lbase + lstop[lnext + pairs - 1] + 1;
        last = rend - 1 - rstop[rnext + pairs - 1];
        lnext += pairs;
        lleft -= pairs;
        rnext += pairs;
        rleft -= pairs;
    }
    for (;;) {
        while (before(s, s->v[first], p)) first++;
        last--;
        while (before(s, p, s->v[last])) last--;
        if (!(first < last)) return first;
        swap(s, first, last);
        first++;
    }
}

/* Stable insertion sort of a small range: what the final insertion pass does to it. */
static void insertion_sort(Sim *s, int64_t first, int64_t last) {
    for (int64_t i = first + 1; i < last; i++) {
        float val = s->v[i];
        int64_t vix = s->ix[i], j = i;
        while (j > first && before(s, val, s->v[j - 1])) {
            s->v[j] = s->v[j - 1];
            s->ix[j] = s->ix[j - 1];
            j--;
        }
        s->v[j] = val;
        s->ix[j] = vix;
    }
}

/* 0: done; 1: a wanted range ran out of depth (std::sort would heapsort it). */
static int introsort_loop(Sim *s, int64_t first, int64_t last, int64_t depth) {
    while (last - first > THRESHOLD) {
        if (!wanted(s, first, last)) return 0;
        if (depth == 0) return 1;
        depth--;
        int64_t mid = first + (last - first) / 2;
        move_median_to_first(s, first, first + 1, mid, last - 1);
        int64_t cut = unguarded_partition(s, first + 1, last, first);
        if (introsort_loop(s, cut, last, depth)) return 1;
        last = cut;
    }
    if (wanted(s, first, last)) insertion_sort(s, first, last);
    return 0;
}

/* 1 when a key is NaN; else ix = 0, 1, ..., n - 1 and 0. */
static int32_t start_order(const float *v, int64_t *ix, int64_t n) {
    int32_t nan = 0;
    for (int64_t i = 0; i < n; i++) nan |= v[i] != v[i];
    if (nan) return 1;
    for (int64_t i = 0; i < n; i++) ix[i] = i;
    return 0;
}

/* Fill ix with 0..n-1 and permute (v, ix) as far as needed for positions [first[w], last[w])
 * of every window to hold what std::sort would put there. Returns 0; 1 when the caller must
 * sort in full (ix holds where each key now is); 2 when a key is NaN or there are too many
 * windows (nothing moved). depth < 0: std::sort's depth limit (a smaller one is for tests of
 * that fallback). */
int32_t ck_sort_windows(float *v, int64_t *ix, int64_t n, int32_t descending,
                        const int64_t *first, const int64_t *last, int32_t windows,
                        int64_t depth) {
    if (windows > MAX_WINDOWS || start_order(v, ix, n)) return 2;
    Sim s = {v, ix, descending, windows, {0}, {0}};
    for (int32_t w = 0; w < windows; w++) {
        s.first[w] = first[w];
        s.last[w] = last[w];
    }
    if (n <= 1) return 0;
    int64_t lg = 0;
    for (int64_t m = n; m > 1; m >>= 1) lg++;
    return introsort_loop(&s, 0, n, depth < 0 ? 2 * lg : depth);
}

/* std::nth_element(first, first + nth, last) as libstdc++ runs it (introselect: the same
 * pivot and partition as the sort, descending only into the side that holds nth, ranges of 3
 * or fewer left to an insertion sort), which torch.topk uses for a large k on the CPU: after
 * it, positions [0, nth] hold the entries topk returns. ix is filled as by ck_sort_windows;
 * returns 0, 1 where the library would switch to a heap select (the caller then runs
 * torch.topk), or 2 when a key is NaN (nothing moved). */
int32_t ck_nth_element(float *v, int64_t *ix, int64_t n, int64_t nth, int32_t descending,
                       int64_t depth) {
    Sim s = {v, ix, descending, 0, {0}, {0}};
    if (start_order(v, ix, n)) return 2;
    if (n <= 1) return 0;
    if (depth < 0) {
        int64_t lg = 0;
        for (int64_t m = n; m > 1; m >>= 1) lg++;
        depth = 2 * lg;
    }
    int64_t first = 0, last = n;
    while (last - first > 3) {
        if (depth == 0) return 1;
        depth--;
        int64_t mid = first + (last - first) / 2;
        move_median_to_first(&s, first, first + 1, mid, last - 1);
        int64_t cut = unguarded_partition(&s, first + 1, last, first);
        if (cut <= nth) first = cut;
        else last = cut;
    }
    insertion_sort(&s, first, last);
    return 0;
}
