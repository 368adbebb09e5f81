/* Decode attention over runs of a CPU arena's rows, read in place (see native.py, which builds this file).
 *
 * Each (sequence, KV head) pair `bh` has G query rows q[bh, g, :D] and attends to `units` runs of
 * consecutive arena rows: run u covers rows first[bh*units + u] .. + count[bh*units + u] of k and v (row r
 * at k + r*D). Rows are scored in blocks with an online softmax, so nothing is copied and every row is read
 * once for all G query rows of its KV head. Writes out[bh, g, :D] (float32) and lse[bh, g] (natural log of
 * the sum of exp(scale * q.k)), out 0 and lse -inf where nothing is attended: what torch's fused kernel
 * returns, so the result merges with other partial attentions the same way.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "select_pages.h"

#define BLOCK 64
#define AHEAD 16 /* rows of prefetch distance (8-48 measured alike) */
#define WIDE 4   /* query rows per KV head from which eight rows are scored abreast */
#define TRAIN 32 /* below WIDE query rows, prefetched rows at the start of each run (16-64 measured alike) */

/* exp(x) for x <= 0 without a libm call, so that a block's loop vectorises (a scalar expf per score was a
 * third of the kernel's time with one query row): x = n ln2 + r with |r| <= ln2/2, exp(r) by Cephes' degree-6
 * polynomial (within 2 ulp of expf), 2^n put in the exponent bits. 0 below -87, where expf is under FLT_MIN:
 * beside the block maximum's 1 nothing can tell. */
static inline float exp_neg(float x) {
    const float big = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const float xc = x < -87.0f ? -87.0f : x;
    const float n = (xc * 1.44269504088896341f + big) - big;
    const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    union {
        float f;
        int32_t i;
    } two_n;
    two_n.i = ((int32_t)n + 127) << 23;
    return x < -87.0f ? 0.0f : p * two_n.f;
}

/* A cursor AHEAD rows past the row being scored, across runs: its K and V rows are prefetched, since the
 * hardware prefetcher picks a stream up only after its first misses, at every run's start (in the sparse step a
 * run is a few pages; measured, the kernel took 7-13% less time in the step). Stepped once per row scored:
 * issued all at once for a block, the prefetches measured slower than none. */
struct ahead {
    const float *k, *v;
    const int64_t *first, *count;
    int64_t units, d, u, r;
};

static void ahead_start(struct ahead *a) {
    for (int64_t skip = AHEAD; a->u < a->units;) {
        const int64_t left = a->count[a->u] - a->r;
        if (skip < left) {
            a->r += skip;
            return;
        }
        skip -= left > 0 ? left : 0;
        a->u++;
        a->r = 0;
    }
}

static inline void ahead_fetch(const struct ahead *a) {
    const char *pk = (const char *)(a->k + (a->first[a->u] + a->r) * a->d);
    const char *pv = (const char *)(a->v + (a->first[a->u] + a->r) * a->d);
    for (int64_t o = 0; o < a->d * (int64_t)sizeof(float); o += 64) {
        __builtin_prefetch(pk + o, 0, 3);
        __builtin_prefetch(pv + o, 0, 3);
    }
}

static inline void ahead_advance(struct ahead *a) {
    if (++a->r >= a->count[a->u]) {
        a->r = 0;
        do a->u++; while (a->u < a->units && a->count[a->u] <= 0);
    }
}

static inline void ahead_step(struct ahead *a) {
    if (a->u >= a->units) return;
    ahead_fetch(a);
    ahead_advance(a);
}

/* The step for few query rows, where a row is scored quickly: only a run's first TRAIN rows are prefetched and
 * past them the hardware streams alone (over 16 heads x 4096 rows from memory, one query row, prefetching every
 * row measured 1.15-1.4x slower than this; with four rows prefetching every row stayed the faster). */
static inline void ahead_step_starts(struct ahead *a) {
    if (a->u >= a->units) return;
    if (a->r < TRAIN) ahead_fetch(a);
    ahead_advance(a);
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EIGHT_ROWS 1
/* Lane t of the result: the sum of a[t]'s eight lanes. */
static inline __m256 lane_sums(const __m256 *a) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#else
#define EIGHT_ROWS 0
#endif

#if EIGHT_ROWS
/* q . k for eight consecutive rows k0 (AVX2, d a multiple of 8) into the lanes of one vector: one horizontal
 * reduction per eight scores instead of one per score. Row by row, each row read front to back with its
 * prefetch step (`pf`, NULL: none) just before: with few query rows this kept the kernel as fast as one row at
 * a time on rows read from memory, and 1.6x faster on rows in cache. */
static inline __m256 eight_rows_in_turn(const float *qg, const float *k0, int64_t d, struct ahead *pf) {
    __m256 a[8];
    for (int t = 0; t < 8; t++) {
        if (pf) ahead_step_starts(pf);
        const float *kt = k0 + t * d;
        __m256 x = _mm256_setzero_ps(), y = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= d; j += 16) {
            x = _mm256_fmadd_ps(_mm256_loadu_ps(qg + j), _mm256_loadu_ps(kt + j), x);
            y = _mm256_fmadd_ps(_mm256_loadu_ps(qg + j + 8), _mm256_loadu_ps(kt + j + 8), y);
        }
        if (j < d) x = _mm256_fmadd_ps(_mm256_loadu_ps(qg + j), _mm256_loadu_ps(kt + j), x);
        a[t] = _mm256_add_ps(x, y);
    }
    return lane_sums(a);
}

/* The same eight scores, the eight rows read side by side, eight columns at a time: each load of q serves eight
 * rows (what pays from WIDE query rows on, where q is read once per row and query row). */
static inline __m256 eight_rows_abreast(const float *qg, const float *k0, int64_t d) {
    __m256 a[8];
    for (int t = 0; t < 8; t++) a[t] = _mm256_setzero_ps();
    for (int64_t j = 0; j < d; j += 8) {
        const __m256 qv = _mm256_loadu_ps(qg + j);
        for (int t = 0; t < 8; t++) a[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + t * d + j), a[t]);
    }
    return lane_sums(a);
}
#endif

/* scores[g * BLOCK + i] = scale * q[g] . k[i] for the block's n rows: eight rows at a time where AVX2 and d (a
 * multiple of 8) allow, in turn below WIDE query rows and abreast from there; the rest one at a time. */
static void score_block(const float *q, const float *kb, int64_t n, int64_t g_n, int64_t d, float scale,
                        float *scores, struct ahead *pf) {
    int64_t i0 = 0;
#if EIGHT_ROWS
    if (d % 8 == 0) {
        const __m256 sc = _mm256_set1_ps(scale);
        for (; i0 + 8 <= n; i0 += 8) {
            const float *k0 = kb + i0 * d;
            if (g_n >= WIDE)
                for (int t = 0; t < 8; t++) ahead_step(pf);
            for (int64_t g = 0; g < g_n; g++) {
                const __m256 s = g_n >= WIDE ? eight_rows_abreast(q + g * d, k0, d)
                                             : eight_rows_in_turn(q + g * d, k0, d, g == 0 ? pf : NULL);
                _mm256_storeu_ps(scores + g * BLOCK + i0, _mm256_mul_ps(s, sc));
            }
        }
    }
#endif
    for (int64_t i = i0; i < n; i++) {
        const float *kr = kb + i * d;
        ahead_step(pf);
        for (int64_t g = 0; g < g_n; g++) {
            const float *qg = q + g * d;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < d; j++) s += qg[j] * kr[j];
            scores[g * BLOCK + i] = s * scale;
        }
    }
}

/* out[g] += sum over the block's n rows of p[g][i] * v[i]. With AVX2 each query row's output is held in
 * registers, 64 columns at a time, across the block (row by row over the block, reading and writing the
 * output for every row, measured 7-15% slower with one or two query rows); the rest of the columns and
 * other CPUs row by row. */
static void add_values(float *out, const float *p, const float *vb, int64_t n, int64_t g_n, int64_t d) {
#if EIGHT_ROWS
    for (int64_t g = 0; g < g_n; g++) {
        float *o = out + g * d;
        const float *pg = p + g * BLOCK;
        int64_t j0 = 0;
        for (; j0 + 64 <= d; j0 += 64) {
            __m256 a[8];
            for (int t = 0; t < 8; t++) a[t] = _mm256_loadu_ps(o + j0 + 8 * t);
            for (int64_t i = 0; i < n; i++) {
                const __m256 pi = _mm256_set1_ps(pg[i]);
                const float *vr = vb + i * d + j0;
                for (int t = 0; t < 8; t++) a[t] = _mm256_fmadd_ps(pi, _mm256_loadu_ps(vr + 8 * t), a[t]);
            }
            for (int t = 0; t < 8; t++) _mm256_storeu_ps(o + j0 + 8 * t, a[t]);
        }
        for (int64_t i = 0; i < n && j0 < d; i++) {
            const float pi = pg[i], *vr = vb + i * d;
#pragma omp simd
            for (int64_t j = j0; j < d; j++) o[j] += pi * vr[j];
        }
    }
#else
    for (int64_t i = 0; i < n; i++) {
        const float *vr = vb + i * d;
        for (int64_t g = 0; g < g_n; g++) {
            const float pi = p[g * BLOCK + i];
            float *o = out + g * d;
#pragma omp simd
            for (int64_t j = 0; j < d; j++) o[j] += pi * vr[j];
        }
    }
#endif
}

static void attend_pair(const float *q, const float *k, const float *v, const int64_t *first,
                        const int64_t *count, int64_t units, int64_t g_n, int64_t d, float scale,
                        float *out, float *lse, float *scores /* [g_n * BLOCK] */, float *top /* [g_n] */,
                        float *sum /* [g_n] */) {
    for (int64_t g = 0; g < g_n; g++) {
        top[g] = -INFINITY;
        sum[g] = 0.0f;
        for (int64_t j = 0; j < d; j++) out[g * d + j] = 0.0f;
    }
    struct ahead pf = {k, v, first, count, units, d, 0, 0};
    ahead_start(&pf);
    for (int64_t u = 0; u < units; u++) {
        const int64_t run_first = first[u], run_rows = count[u];
        for (int64_t b0 = 0; b0 < run_rows; b0 += BLOCK) {
            const int64_t n = run_rows - b0 < BLOCK ? run_rows - b0 : BLOCK;
            const float *kb = k + (run_first + b0) * d, *vb = v + (run_first + b0) * d;
            score_block(q, kb, n, g_n, d, scale, scores, &pf);
            for (int64_t g = 0; g < g_n; g++) {
                float *sg = scores + g * BLOCK, m = top[g];
#pragma omp simd reduction(max : m)
                for (int64_t i = 0; i < n; i++) m = sg[i] > m ? sg[i] : m;
                const float rescale = top[g] == -INFINITY ? 0.0f : expf(top[g] - m);
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t i = 0; i < n; i++) {
                    sg[i] = exp_neg(sg[i] - m);
                    s += sg[i];
                }
                sum[g] = sum[g] * rescale + s;
                top[g] = m;
                if (rescale != 1.0f) {
                    float *og = out + g * d;
                    for (int64_t j = 0; j < d; j++) og[j] *= rescale;
                }
            }
            add_values(out, scores, vb, n, g_n, d);
        }
    }
    for (int64_t g = 0; g < g_n; g++) {
        if (sum[g] > 0.0f) {
            const float inv = 1.0f / sum[g];
            for (int64_t j = 0; j < d; j++) out[g * d + j] *= inv;
            lse[g] = top[g] + logf(sum[g]);
        } else {
            lse[g] = -INFINITY;
        }
    }
}

/* Whether every run lies inside [0, rows). Kept out of line: inlined, it slowed the attention loop (measured
 * 25% on the benchmark CPU). */
__attribute__((noinline)) static int runs_inside(const int64_t *first, const int64_t *count, int64_t n,
                                                 int64_t rows) {
    for (int64_t i = 0; i < n; i++)
        if (count[i] < 0 || (count[i] > 0 && (first[i] < 0 || first[i] > rows - count[i]))) return 0;
    return 1;
}

/* Pairs [pair_lo, pair_hi) of the whole problem: callers split the pairs across threads. `work` holds
 * g_n * (BLOCK + 2) floats for this caller alone. Returns 0, or -2 (nothing computed) where a run of these
 * pairs reaches outside the arena's `rows` rows. */
int kvtier_run_attention_f32(const float *q, const float *k, const float *v, const int64_t *first,
                             const int64_t *count, int64_t rows, int64_t pair_lo, int64_t pair_hi, int64_t units,
                             int64_t g_n, int64_t d, float scale, float *out, float *lse, float *work) {
    if (!runs_inside(first + pair_lo * units, count + pair_lo * units, (pair_hi - pair_lo) * units, rows)) return -2;
    float *scores = work, *top = work + g_n * BLOCK, *sum = top + g_n;
    for (int64_t bh = pair_lo; bh < pair_hi; bh++)
        attend_pair(q + bh * g_n * d, k, v, first + bh * units, count + bh * units, units, g_n, d, scale,
                    out + bh * g_n * d, lse + bh * g_n, scores, top, sum);
    return 0;
}

/* The arena a sparse step reads: the device chunks' slots end to end (flat [flat_n]; chunk row c's `length[c]`
 * slots start at offset[c], -1 for a chunk off the arena; run_first[c]: its first slot where they are one run
 * of consecutive slots, else -1), the recent window's win_n slots (oldest first), and the rows of k and v: pair
 * p's slot i at row p * plane + i, every slot read below `slots`. */
typedef struct {
    const int64_t *flat;
    int64_t flat_n;
    const int64_t *offset, *run_first, *length;
    int64_t win_n;
    const int64_t *win;
    const float *k, *v;
    int64_t plane, slots;
} Arena;

/* Whether the arena's tables hold together for c_n chunks: every chunk on the arena inside the slot list. */
static int arena_ok(const Arena *a, int64_t c_n) {
    if (a->flat_n < 0 || a->win_n < 0 || a->slots < 0 || a->slots > a->plane) return 0;
    for (int64_t c = 0; c < c_n; c++)
        if (a->length[c] < 0 || a->offset[c] < -1 || (a->offset[c] >= 0 && a->offset[c] > a->flat_n - a->length[c]))
            return 0;
    return 1;
}

/* Most runs one pair can read: one per slot listed (its units hold distinct tokens of the arena), then the
 * window's. */
static int64_t runs_width(const Arena *a) { return a->flat_n + a->win_n + 1; }

/* Appends slots [s0, s0 + n) to the runs in start, run_len (scratch [runs_width]). Returns the run count, or
 * -2 past the width or outside the pair's slots. */
static int64_t add_run(const Arena *a, int64_t s0, int64_t n, int64_t *start, int64_t *run_len, int64_t runs) {
    if (s0 < 0 || n < 0 || s0 > a->slots - n || runs == runs_width(a)) return -2;
    start[runs] = s0;
    run_len[runs] = n;
    return runs + 1;
}

/* Appends slots[0 .. n) to the runs, one run per stretch of consecutive slots (see add_run). */
static int64_t add_slot_runs(const Arena *a, const int64_t *slot, int64_t n, int64_t *start, int64_t *run_len,
                             int64_t runs) {
    for (int64_t i = 0; i < n && runs >= 0;) {
        int64_t j = i + 1;
        while (j < n && slot[j] == slot[j - 1] + 1) j++;
        runs = add_run(a, slot[i], j - i, start, run_len, runs);
        i = j;
    }
    return runs;
}

/* One pair's attention over its units (chunk row, offset in the chunk, tokens; size 0: none), then the
 * window, read in place: the units' slots walked as runs of consecutive slots into start, run_len (scratch
 * [runs_width]), then attended. Returns 0; -2 for a unit outside its chunk or a slot outside the pair's; -3
 * where a unit's chunk is off the arena. */
static int attend_units(const Arena *a, int64_t c_n, int64_t pair, const int64_t *chunk, const int64_t *off,
                        const int64_t *size, int64_t units, int64_t *start, int64_t *run_len, const float *q,
                        int64_t g_n, int64_t d, float scale, float *out, float *lse, float *work) {
    int64_t n = 0;
    for (int64_t u = 0; u < units && n >= 0; u++) {
        if (size[u] <= 0) continue;
        const int64_t c = chunk[u];
        if (c < 0 || c >= c_n || off[u] < 0 || off[u] > a->length[c] - size[u]) return -2;
        if (a->offset[c] < 0) return -3;
        if (a->run_first[c] >= 0)  /* the usual chunk: one run, its slot list not read */
            n = add_run(a, a->run_first[c] + off[u], size[u], start, run_len, n);
        else
            n = add_slot_runs(a, a->flat + a->offset[c] + off[u], size[u], start, run_len, n);
    }
    n = add_slot_runs(a, a->win, a->win_n, start, run_len, n);
    if (n < 0) return -2;
    for (int64_t r = 0; r < n; r++) start[r] += pair * a->plane;
    float *scores = work, *top = work + g_n * BLOCK, *sum = top + g_n;
    attend_pair(q, a->k, a->v, start, run_len, n, g_n, d, scale, out, lse, scores, top, sum);
    return 0;
}

/* Attention of pairs [pair_lo, pair_hi) over their units (chunk, off, size [pairs, units]: `Selection.units`)
 * read in place from the arena (its tables flat through slots, as Arena has them): q [pairs, G, D]; out
 * [pairs, G, D], lse [pairs, G] (absolute rows). One call where listing the runs and attending over them took
 * a Python wrapper each. Returns 0; -1 without memory; -2 for tables or runs pointing outside what they index;
 * -3 where a unit's chunk is off the arena (off the device). */
int kvtier_unit_attention_f32(const float *q, int64_t g_n, int64_t d, const int64_t *chunk, const int64_t *off,
                              const int64_t *size, int64_t units, int64_t c_n, const int64_t *flat, int64_t flat_n,
                              const int64_t *offset, const int64_t *run_first, const int64_t *length, int64_t win_n,
                              const int64_t *win, const float *k, const float *v, int64_t plane, int64_t slots,
                              float scale, int64_t pair_lo, int64_t pair_hi, float *out, float *lse) {
    const Arena a = {flat, flat_n, offset, run_first, length, win_n, win, k, v, plane, slots};
    if (pair_lo < 0 || pair_hi < pair_lo || units < 0 || !arena_ok(&a, c_n)) return -2;
    int64_t *runs = malloc((size_t)(2 * runs_width(&a)) * sizeof(int64_t));
    float *work = malloc((size_t)(g_n * (BLOCK + 2) + 1) * sizeof(float));
    int rc = !runs || !work ? -1 : 0;
    for (int64_t pair = pair_lo; !rc && pair < pair_hi; pair++)
        rc = attend_units(&a, c_n, pair, chunk + pair * units, off + pair * units, size + pair * units, units, runs,
                          runs + runs_width(&a), q + pair * g_n * d, g_n, d, scale, out + pair * g_n * d,
                          lse + pair * g_n, work);
    free(runs);
    free(work);
    return rc;
}

/* A whole sparse decode step for pairs [pair_lo, pair_hi) in one call (callers split the pairs across threads):
 * select_pages.c's selection (its arguments, q through shared), then, pair by pair, attention over the selected
 * units read in place from the arena (its tables flat through slots, as Arena has them; chunk lengths are the
 * selection's), as kvtier_unit_attention_f32 does. One call where three took a Python wrapper each, whose cost
 * per layer was a third of the C's own on the benchmark CPU. Writes, for each pair of the range (absolute rows), out [G, D] and
 * lse [G]; for the range, the chunks holding anything any of its pairs selected (held [C]: rows in increasing
 * order) and found[0], found[1]: how many, and the tokens its pairs selected in all. Returns 0; -1 without
 * memory; -2 for tables or runs pointing outside what they index; -3 where a selected token is not in the arena
 * (a chunk off the device: the caller stages instead). */
int kvtier_sparse_step_f32(const float *q, int64_t b_n, int64_t hkv, int64_t g_n, int64_t d, const void *kmin,
                           const void *kmax, int64_t kb, int64_t kh, int64_t half, int64_t c_n, const float *pmin,
                           const float *pmax, int64_t pb, int64_t ph, int64_t p_n, const int64_t *length,
                           const int64_t *first, const int64_t *count, const int64_t *page_len,
                           const int64_t *chunk_of, const int64_t *page_off, const uint8_t *forced,
                           const uint8_t *has_tokens, int64_t budget, int64_t candidates, int64_t shared,
                           const int64_t *flat, int64_t flat_n, const int64_t *offset, const int64_t *run_first,
                           int64_t win_n, const int64_t *win, const float *k, const float *v, int64_t plane,
                           int64_t slots, float scale, int64_t pair_lo, int64_t pair_hi, float *out, float *lse,
                           int64_t *held, int64_t *found) {
    const Arena a = {flat, flat_n, offset, run_first, length, win_n, win, k, v, plane, slots};
    if (pair_lo < 0 || pair_hi < pair_lo || pair_hi > b_n * hkv || c_n < 1 || p_n < 1 || !arena_ok(&a, c_n))
        return -2;
    const int64_t n = pair_hi - pair_lo, cu = c_n + p_n, width = runs_width(&a);
    int64_t *whole = malloc((size_t)(n * c_n + n * p_n + 3 * n * cu + 2 * n + 2 * width + 1) * sizeof(int64_t));
    float *work = malloc((size_t)(g_n * (BLOCK + 2) + 1) * sizeof(float));
    uint8_t *chunk_sel = malloc((size_t)(n * c_n + 1));
    int rc = !whole || !work || !chunk_sel ? -1 : 0;
    if (!rc) {
        int64_t *parts = whole + n * c_n, *unit_chunk = parts + n * p_n, *unit_off = unit_chunk + n * cu,
                *unit_size = unit_off + n * cu, *n_whole = unit_size + n * cu, *n_parts = n_whole + n,
                *start = n_parts + n, *run_len = start + width;
        rc = kvtier_select_pages_f32(q, b_n, hkv, g_n, d, kmin, kmax, kb, kh, half, c_n, pmin, pmax, pb, ph, p_n,
                                     length, first, count, page_len, chunk_of, page_off, forced, has_tokens, budget,
                                     candidates, shared, pair_lo, pair_hi, whole, n_whole, parts, n_parts,
                                     chunk_sel, unit_chunk, unit_off, unit_size);
        int64_t selected = 0;
        for (int64_t at = 0; !rc && at < n; at++) {
            const int64_t pair = pair_lo + at, units = n_whole[at] + n_parts[at];
            const int64_t *us = unit_size + at * cu;
            for (int64_t u = 0; u < units; u++) selected += us[u];
            rc = attend_units(&a, c_n, pair, unit_chunk + at * cu, unit_off + at * cu, us, units, start, run_len,
                              q + pair * g_n * d, g_n, d, scale, out + pair * g_n * d, lse + pair * g_n, work);
        }
        int64_t n_held = 0;
        for (int64_t c = 0; !rc && c < c_n; c++) {
            uint8_t any = 0;
            for (int64_t at = 0; at < n; at++) any |= chunk_sel[at * c_n + c];
            if (any) held[n_held++] = c;
        }
        found[0] = n_held;
        found[1] = selected;
    }
    free(whole);
    free(work);
    free(chunk_sel);
    return rc;
}
