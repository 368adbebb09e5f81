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
#include <stdint.h>

#define BLOCK 64
#define AHEAD 16 /* rows of prefetch distance (8-48 measured alike) */

static void attend_pair(const float *q, const float *k, const float *v, const int64_t *first,
                        const int64_t *count, int64_t units, int64_t g_n, int64_t d, float scale,
                        float *out, float *lse, float *scores /* [g_n * BLOCK] */, float *top /* [g_n] */,
                        float *sum /* [g_n] */) {
    for (int64_t g = 0; g < g_n; g++) {
        top[g] = -INFINITY;
        sum[g] = 0.0f;
        for (int64_t j = 0; j < d; j++) out[g * d + j] = 0.0f;
    }
    /* A cursor AHEAD rows past the row being scored, across runs: its K and V rows are prefetched, since the
     * hardware prefetcher stops at every page boundary and at every run's start (in the sparse step a run is a
     * few pages; measured, the kernel took 7-13% less time in the step). */
    int64_t ahead_u = 0, ahead_r = 0;
    for (int64_t skip = AHEAD; ahead_u < units;) {
        const int64_t left = count[ahead_u] - ahead_r;
        if (skip < left) {
            ahead_r += skip;
            break;
        }
        skip -= left > 0 ? left : 0;
        ahead_u++;
        ahead_r = 0;
    }
    for (int64_t u = 0; u < units; u++) {
        const int64_t run_first = first[u], run_rows = count[u];
        for (int64_t b0 = 0; b0 < run_rows; b0 += BLOCK) {
            const int64_t n = run_rows - b0 < BLOCK ? run_rows - b0 : BLOCK;
            const float *kb = k + (run_first + b0) * d, *vb = v + (run_first + b0) * d;
            for (int64_t i = 0; i < n; i++) {
                const float *kr = kb + i * d;
                if (ahead_u < units) {
                    const char *pk = (const char *)(k + (first[ahead_u] + ahead_r) * d);
                    const char *pv = (const char *)(v + (first[ahead_u] + ahead_r) * d);
                    for (int64_t o = 0; o < d * (int64_t)sizeof(float); o += 64) {
                        __builtin_prefetch(pk + o, 0, 3);
                        __builtin_prefetch(pv + o, 0, 3);
                    }
                    if (++ahead_r >= count[ahead_u]) {
                        ahead_r = 0;
                        do ahead_u++; while (ahead_u < units && count[ahead_u] <= 0);
                    }
                }
                for (int64_t g = 0; g < g_n; g++) {
                    const float *qg = q + g * d;
                    float s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int64_t j = 0; j < d; j++) s += qg[j] * kr[j];
                    scores[g * BLOCK + i] = s * scale;
                }
            }
            for (int64_t g = 0; g < g_n; g++) {
                float *sg = scores + g * BLOCK, m = top[g];
                for (int64_t i = 0; i < n; i++) m = sg[i] > m ? sg[i] : m;
                const float rescale = top[g] == -INFINITY ? 0.0f : expf(top[g] - m);
                float *og = out + g * d;
                if (rescale != 1.0f)
                    for (int64_t j = 0; j < d; j++) og[j] *= rescale;
                float s = sum[g] * rescale;
                for (int64_t i = 0; i < n; i++) {
                    sg[i] = expf(sg[i] - m);
                    s += sg[i];
                }
                sum[g] = s;
                top[g] = m;
            }
            for (int64_t i = 0; i < n; i++) {
                const float *vr = vb + i * d;
                for (int64_t g = 0; g < g_n; g++) {
                    const float p = scores[g * BLOCK + i];
                    float *og = out + g * d;
#pragma omp simd
                    for (int64_t j = 0; j < d; j++) og[j] += p * vr[j];
                }
            }
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

/* The runs of arena slots a sparse step reads, per (sequence, KV head) pair: each unit (chunk row, offset in
 * the chunk, tokens; size 0: none) cut by the pieces its chunk lies in (pieces first[c] .. + count[c], each
 * at offset p_off in its chunk, from slot p_slot, p_len slots), then the recent window's slots (win_n, oldest
 * first) as runs of consecutive slots. Writes each pair's runs compactly into start/length [pairs, width],
 * length 0 past the last. Returns 0; -1 where a unit's tokens are not all in pieces (a chunk off the device);
 * -2 for tables pointing outside themselves or more runs than width. */
int kvtier_unit_runs(int64_t pairs, int64_t units, const int64_t *chunk, const int64_t *off, const int64_t *size,
                     int64_t c_n, const int64_t *first, const int64_t *count, int64_t pieces, const int64_t *p_off,
                     const int64_t *p_slot, const int64_t *p_len, int64_t win_n, const int64_t *win,
                     int64_t width, int64_t *start, int64_t *length) {
    for (int64_t c = 0; c < c_n; c++)
        if (first[c] < 0 || count[c] < 0 || first[c] > pieces || count[c] > pieces - first[c]) return -2;
    for (int64_t bh = 0; bh < pairs; bh++) {
        int64_t n = 0;
        for (int64_t u = bh * units; u < (bh + 1) * units; u++) {
            if (size[u] <= 0) continue;
            const int64_t c = chunk[u];
            if (c < 0 || c >= c_n) return -2;
            const int64_t lo_u = off[u], hi_u = off[u] + size[u];
            int64_t covered = 0;
            for (int64_t p = first[c]; p < first[c] + count[c]; p++) {
                const int64_t lo = lo_u > p_off[p] ? lo_u : p_off[p];
                const int64_t hi = hi_u < p_off[p] + p_len[p] ? hi_u : p_off[p] + p_len[p];
                if (hi <= lo) continue;
                if (n == width) return -2;
                start[bh * width + n] = p_slot[p] + lo - p_off[p];
                length[bh * width + n++] = hi - lo;
                covered += hi - lo;
            }
            if (covered != size[u]) return -1;
        }
        for (int64_t i = 0; i < win_n;) {
            int64_t j = i + 1;
            while (j < win_n && win[j] == win[j - 1] + 1) j++;
            if (n == width) return -2;
            start[bh * width + n] = win[i];
            length[bh * width + n++] = j - i;
            i = j;
        }
        for (; n < width; n++) {
            start[bh * width + n] = 0;
            length[bh * width + n] = 0;
        }
    }
    return 0;
}
