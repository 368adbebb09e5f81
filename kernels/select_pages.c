/* Quest-bound page selection for one decode step on a CPU (see native.py, which builds this file, and
 * kvtier/sparse/select.py, whose `Selector.select_pages` this computes for `QuestBound` and its shared form).
 *
 * Per (sequence, KV head), or per sequence with `shared` (scores maxed over heads, one choice for all heads):
 *   1. score every chunk (its bounds float32, or float16 rounded outward with `half`): max over the query group
 *      of sum_d max(q_d * kmin_d, q_d * kmax_d); -inf for forced
 *      chunks (sinks, taken anyway), chunks holding only padding, and NaN scores;
 *   2. rank by score, ties by index (a heap: only the ranks the budget reaches are ordered);
 *   3. take the best chunks whole while their tokens fit the budget; the chunks ranked next whose preceding
 *      candidates hold under `candidates` x what is left are candidates;
 *   4. score the candidates' pages the same way, rank them (ties in candidate order) and take them as
 *      `take_in_order` does: the best while they fit what is left, then the best of the rest that still fit.
 * Writes, per pair: the sinks then the whole chunks in rank order (whole, n_whole), the taken pages in rank
 * order (parts, n_parts), each list's rows padded with 0, and the chunks holding anything selected
 * (chunk_sel). The torch path sums in another order, so scores may differ in the last bit; with exactly
 * representable inputs both agree exactly.
 *
 * Tables are checked before anything is read: a page row outside [0, P), a page listed by a chunk it does not
 * belong to, or a negative or absurd length returns -2 and writes nothing.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "select_pages.h"

#define MAX_LENGTH ((int64_t)1 << 40)

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HALF_BOUNDS 1
#else
#define HALF_BOUNDS 0
#endif

typedef struct {
    const float *q;  /* [B, Hkv * G, 2, D]: each query row's positive part, then its negative part */
    int64_t hkv, g_n, d;
    const void *kmin, *kmax;  /* chunk bounds: element (b, h, c, j) at b * kb + h * kh + c * d + j */
    int64_t kb, kh, half;     /* half: the chunk bounds are IEEE float16 (rounded outward), else float32 */
    const float *pmin, *pmax;  /* page bounds, laid out the same way with strides pb, ph */
    int64_t pb, ph;
} Bounds;

typedef float v8f __attribute__((vector_size(32)));

/* The bound of q.k over a row of bounds, max over the query group of KV head h: q+ . max + q- . min, eight
 * channels at a time in two accumulators (the compiler's own reduction kept one, spilled to the stack). */
static float bound_score(const Bounds *t, int64_t b, int64_t h, const float *lo, const float *hi) {
    const int64_t d = t->d;
    const float *qh = t->q + (b * t->hkv + h) * t->g_n * 2 * d;
    float best = -INFINITY;
    for (int64_t g = 0; g < t->g_n; g++) {
        const float *pos = qh + g * 2 * d, *neg = pos + d;
        v8f acc0 = {0}, acc1 = {0}, x, y, z, w;
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            __builtin_memcpy(&x, pos + j, sizeof x);
            __builtin_memcpy(&y, hi + j, sizeof y);
            __builtin_memcpy(&z, neg + j, sizeof z);
            __builtin_memcpy(&w, lo + j, sizeof w);
            acc0 += x * y;
            acc1 += z * w;
        }
        acc0 += acc1;
        float s = ((acc0[0] + acc0[4]) + (acc0[1] + acc0[5])) + ((acc0[2] + acc0[6]) + (acc0[3] + acc0[7]));
        for (; j < d; j++) s += pos[j] * hi[j] + neg[j] * lo[j];
        best = s > best ? s : best;
    }
    return best;
}

#if HALF_BOUNDS
/* bound_score over float16 bounds (what every chunk's row costs a step: half the bytes of float32). */
static float bound_score_half(const Bounds *t, int64_t b, int64_t h, const uint16_t *lo, const uint16_t *hi) {
    const int64_t d = t->d;
    const float *qh = t->q + (b * t->hkv + h) * t->g_n * 2 * d;
    float best = -INFINITY;
    for (int64_t g = 0; g < t->g_n; g++) {
        const float *pos = qh + g * 2 * d, *neg = pos + d;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            const __m256 y = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(hi + j)));
            const __m256 w = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(lo + j)));
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pos + j), y, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(neg + j), w, acc1);
        }
        float a[8];
        _mm256_storeu_ps(a, _mm256_add_ps(acc0, acc1));
        float s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
        for (; j < d; j++) s += pos[j] * _cvtsh_ss(hi[j]) + neg[j] * _cvtsh_ss(lo[j]);
        best = s > best ? s : best;
    }
    return best;
}
#endif

static float chunk_score(const Bounds *t, int64_t b, int64_t h, int64_t c) {
    const int64_t at = b * t->kb + h * t->kh + c * t->d;
#if HALF_BOUNDS
    if (t->half) return bound_score_half(t, b, h, (const uint16_t *)t->kmin + at, (const uint16_t *)t->kmax + at);
#endif
    return bound_score(t, b, h, (const float *)t->kmin + at, (const float *)t->kmax + at);
}

/* Whether this build reads float16 chunk bounds (AVX2, FMA and F16C). */
int kvtier_select_reads_half(void) { return HALF_BOUNDS; }

static float page_score(const Bounds *t, int64_t b, int64_t h, int64_t p) {
    const int64_t at = b * t->pb + h * t->ph + p * t->d;
    return bound_score(t, b, h, t->pmin + at, t->pmax + at);
}

/* Rank order: a higher score first, equal scores by lower index. */
static int before(const float *score, int64_t a, int64_t b) {
    return score[a] > score[b] || (score[a] == score[b] && a < b);
}

static void sift_down(int64_t *heap, int64_t n, int64_t i, const float *score) {
    for (;;) {
        int64_t best = i, l = 2 * i + 1, r = l + 1;
        if (l < n && before(score, heap[l], heap[best])) best = l;
        if (r < n && before(score, heap[r], heap[best])) best = r;
        if (best == i) return;
        const int64_t tmp = heap[i];
        heap[i] = heap[best];
        heap[best] = tmp;
        i = best;
    }
}

static int64_t heap_pop(int64_t *heap, int64_t *n, const float *score) {
    const int64_t top = heap[0];
    heap[0] = heap[--*n];
    sift_down(heap, *n, 0, score);
    return top;
}

/* Stable merge sort of entries 0..n-1 (held in idx) by key, descending; tmp holds n entries. */
static void sort_desc(int64_t *idx, int64_t *tmp, int64_t n, const float *key) {
    for (int64_t width = 1; width < n; width *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * width) {
            int64_t mid = lo + width < n ? lo + width : n, hi = lo + 2 * width < n ? lo + 2 * width : n;
            int64_t i = lo, j = mid, o = lo;
            while (i < mid && j < hi) tmp[o++] = key[idx[j]] > key[idx[i]] ? idx[j++] : idx[i++];
            while (i < mid) tmp[o++] = idx[i++];
            while (j < hi) tmp[o++] = idx[j++];
        }
        memcpy(idx, tmp, n * sizeof *idx);
    }
}

typedef struct {
    int64_t c_n, p_n, budget, candidates;
    const int64_t *length, *first, *count, *page_len;  /* [C], [C], [C], [P] */
    const uint8_t *forced, *has_tokens;  /* [C], [B, C]; either may be NULL */
    float *score, *pscore;  /* scratch [C], [P] */
    int64_t *heap, *cand_page, *order, *tmp;  /* scratch [C], [P], [P], [P] */
    uint8_t *taken;  /* scratch [P] */
} Work;

/* One pair's selection (h < 0: shared over every head). Returns the counts through n_whole, n_parts. */
static void select_one(const Bounds *t, Work *w, int64_t b, int64_t h, int64_t *whole, int64_t *n_whole,
                       int64_t *parts, int64_t *n_parts, uint8_t *chunk_sel) {
    const int64_t c_n = w->c_n;
    const int64_t h_lo = h < 0 ? 0 : h, h_hi = h < 0 ? t->hkv : h + 1;
    int64_t heap_n = 0;
    for (int64_t c = 0; c < c_n; c++) w->score[c] = -INFINITY;
    for (int64_t hh = h_lo; hh < h_hi; hh++)  /* head by head: each head's bounds are one stream through memory */
        for (int64_t c = 0; c < c_n; c++) {
            const float x = chunk_score(t, b, hh, c);
            w->score[c] = x > w->score[c] ? x : w->score[c];
        }
    for (int64_t c = 0; c < c_n; c++) {
        float s = w->score[c];
        if (isnan(s) || (w->forced && w->forced[c]) || (w->has_tokens && !w->has_tokens[b * c_n + c]))
            s = -INFINITY;
        w->score[c] = s;
        if (s > -INFINITY) w->heap[heap_n++] = c;
    }
    for (int64_t i = heap_n / 2 - 1; i >= 0; i--) sift_down(w->heap, heap_n, i, w->score);

    memset(chunk_sel, 0, (size_t)c_n);
    int64_t nw = 0;
    if (w->forced)
        for (int64_t c = 0; c < c_n; c++)
            if (w->forced[c]) {
                whole[nw++] = c;
                chunk_sel[c] = 1;
            }
    int64_t used = 0;
    while (heap_n && used + w->length[w->heap[0]] <= w->budget) {
        const int64_t c = heap_pop(w->heap, &heap_n, w->score);
        whole[nw++] = c;
        chunk_sel[c] = 1;
        used += w->length[c];
    }
    *n_whole = nw;
    const int64_t left = w->budget - used;

    int64_t np = 0, ahead = 0;
    while (heap_n && ahead < w->candidates * left) {
        const int64_t c = heap_pop(w->heap, &heap_n, w->score);
        ahead += w->length[c];
        for (int64_t p = w->first[c]; p < w->first[c] + w->count[c]; p++) {
            float s = -INFINITY;
            for (int64_t hh = h_lo; hh < h_hi; hh++) {
                const float x = page_score(t, b, hh, p);
                s = x > s ? x : s;
            }
            w->pscore[np] = isnan(s) ? -INFINITY : s;
            w->cand_page[np] = p;
            w->order[np] = np;
            np++;
        }
    }
    sort_desc(w->order, w->tmp, np, w->pscore);

    /* take_in_order: the best while they fit, then the best of the rest that still fit what is left. */
    int64_t total = 0, taken_tokens = 0;
    uint8_t *taken = w->taken;
    for (int64_t i = 0; i < np; i++) {
        const int64_t e = w->order[i], size = w->page_len[w->cand_page[e]];
        total += size;
        taken[i] = total <= left && w->pscore[e] > -INFINITY;
        taken_tokens += taken[i] ? size : 0;
    }
    const int64_t rest = left - taken_tokens;
    int64_t fit_total = 0, n = 0;
    for (int64_t i = 0; i < np; i++) {
        const int64_t e = w->order[i], size = w->page_len[w->cand_page[e]];
        if (!taken[i] && w->pscore[e] > -INFINITY && size <= rest) {
            fit_total += size;
            taken[i] = fit_total <= rest;
        }
    }
    for (int64_t i = 0; i < np; i++)
        if (taken[i]) {
            const int64_t e = w->order[i];
            parts[n++] = w->cand_page[e];
        }
    *n_parts = n;
}

/* Returns 0, -1 without memory, -2 for tables that point outside the bounds given (or float16 chunk bounds,
 * `half`, to a build without F16C). chunk_of, page_off: [P] each page row's chunk row and offset in it.
 * Selects for pairs [pair_lo, pair_hi) of the B x Hkv (sequence, KV head) pairs, pair-major, and writes pair
 * pair_lo's rows first (callers split the pairs across threads). Outputs per pair: whole [C], n_whole,
 * parts [P], n_parts, chunk_sel [C], and the entries as units of consecutive tokens [C + P] each (unit_chunk,
 * unit_off, unit_size: the whole chunks, then the pages). Past its count, each pair's row of a list is 0 up to
 * the most any pair of the range has (at least 1), so the first columns of every row form one padded table. */
int kvtier_select_pages_f32(const float *q, int64_t b_n, int64_t hkv, int64_t g_n, int64_t d,
                            const void *kmin, const void *kmax, int64_t kb, int64_t kh, int64_t half, int64_t c_n,
                            const float *pmin, const float *pmax, int64_t pb, int64_t ph, int64_t p_n,
                            const int64_t *length, const int64_t *first, const int64_t *count,
                            const int64_t *page_len, const int64_t *chunk_of, const int64_t *page_off,
                            const uint8_t *forced, const uint8_t *has_tokens, int64_t budget, int64_t candidates,
                            int64_t shared, int64_t pair_lo, int64_t pair_hi, int64_t *whole, int64_t *n_whole,
                            int64_t *parts, int64_t *n_parts, uint8_t *chunk_sel, int64_t *unit_chunk,
                            int64_t *unit_off, int64_t *unit_size) {
    if (c_n < 1 || p_n < 1 || budget < 0 || budget > MAX_LENGTH || candidates < 0 || candidates > 1024) return -2;
    if (pair_lo < 0 || pair_hi < pair_lo || pair_hi > b_n * hkv) return -2;
    if (half && !HALF_BOUNDS) return -2;
    for (int64_t p = 0; p < p_n; p++)
        if (page_len[p] < 0 || page_len[p] > MAX_LENGTH || chunk_of[p] < 0 || chunk_of[p] >= c_n ||
            page_off[p] < 0 || page_off[p] > MAX_LENGTH)
            return -2;
    for (int64_t c = 0; c < c_n; c++) {
        if (length[c] < 0 || length[c] > MAX_LENGTH || first[c] < 0 || count[c] < 0 || first[c] > p_n ||
            count[c] > p_n - first[c])
            return -2;
        for (int64_t p = first[c]; p < first[c] + count[c]; p++)  /* a page belongs to one chunk: no page is */
            if (chunk_of[p] != c) return -2;                       /* listed twice, so at most P are listed */
    }
    const int64_t rows = b_n * hkv * g_n;
    float *split = malloc((rows ? rows : 1) * 2 * d * sizeof(float) + sizeof(float));
    if (!split) return -1;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < d; j++) {
            const float x = q[r * d + j];
            split[r * 2 * d + j] = x > 0.0f ? x : 0.0f;
            split[r * 2 * d + d + j] = x < 0.0f ? x : 0.0f;
        }
    const Bounds t = {split, hkv, g_n, d, kmin, kmax, kb, kh, half, pmin, pmax, pb, ph};
    Work w = {.c_n = c_n, .p_n = p_n, .budget = budget, .candidates = candidates, .length = length,
              .first = first, .count = count, .page_len = page_len, .forced = forced, .has_tokens = has_tokens};
    const int64_t c1 = c_n ? c_n : 1, p1 = p_n ? p_n : 1;
    w.score = malloc(c1 * sizeof(float));
    w.pscore = malloc(p1 * sizeof(float));
    w.heap = malloc(c1 * sizeof(int64_t));
    w.cand_page = malloc(p1 * sizeof(int64_t));
    w.order = malloc(p1 * sizeof(int64_t));
    w.tmp = malloc(p1 * sizeof(int64_t));
    w.taken = malloc(p1);
    int rc = 0;
    if (!w.score || !w.pscore || !w.heap || !w.cand_page || !w.order || !w.tmp || !w.taken) {
        rc = -1;
    } else {
        for (int64_t pair = pair_lo; pair < pair_hi; pair++) {
            const int64_t b = pair / hkv, h = pair % hkv, at = pair - pair_lo;
            int64_t *wp = whole + at * c_n, *pp = parts + at * p_n;
            uint8_t *sel = chunk_sel + at * c_n;
            const int64_t src = (b * hkv > pair_lo ? b * hkv : pair_lo) - pair_lo;  /* the sequence's first pair here */
            if (shared && at > src) {  /* one choice for every head: copy that pair's */
                n_whole[at] = n_whole[src];
                n_parts[at] = n_parts[src];
                memcpy(wp, whole + src * c_n, (size_t)n_whole[at] * sizeof *wp);
                memcpy(pp, parts + src * p_n, (size_t)n_parts[at] * sizeof *pp);
                memcpy(sel, chunk_sel + src * c_n, (size_t)c_n);
            } else {
                select_one(&t, &w, b, shared ? -1 : h, wp, n_whole + at, pp, n_parts + at, sel);
                for (int64_t i = 0; i < n_parts[at]; i++) sel[chunk_of[pp[i]]] = 1;
            }
            int64_t *uc = unit_chunk + at * (c_n + p_n), *uo = unit_off + at * (c_n + p_n),
                    *us = unit_size + at * (c_n + p_n);
            for (int64_t i = 0; i < n_whole[at]; i++) {
                uc[i] = wp[i];
                uo[i] = 0;
                us[i] = length[wp[i]];
            }
            for (int64_t i = 0, u = n_whole[at]; i < n_parts[at]; i++, u++) {
                uc[u] = chunk_of[pp[i]];
                uo[u] = page_off[pp[i]];
                us[u] = page_len[pp[i]];
            }
        }
        const int64_t n_pairs = pair_hi - pair_lo;
        int64_t most_w = 1, most_p = 1, most_u = 1;
        for (int64_t at = 0; at < n_pairs; at++) {
            most_w = n_whole[at] > most_w ? n_whole[at] : most_w;
            most_p = n_parts[at] > most_p ? n_parts[at] : most_p;
            most_u = n_whole[at] + n_parts[at] > most_u ? n_whole[at] + n_parts[at] : most_u;
        }
        for (int64_t at = 0; at < n_pairs; at++) {
            const int64_t nu = n_whole[at] + n_parts[at], row = at * (c_n + p_n);
            memset(whole + at * c_n + n_whole[at], 0, (size_t)(most_w - n_whole[at]) * sizeof *whole);
            memset(parts + at * p_n + n_parts[at], 0, (size_t)(most_p - n_parts[at]) * sizeof *parts);
            memset(unit_chunk + row + nu, 0, (size_t)(most_u - nu) * sizeof *unit_chunk);
            memset(unit_off + row + nu, 0, (size_t)(most_u - nu) * sizeof *unit_off);
            memset(unit_size + row + nu, 0, (size_t)(most_u - nu) * sizeof *unit_size);
        }
    }
    free(w.score);
    free(w.pscore);
    free(w.heap);
    free(w.cand_page);
    free(w.order);
    free(w.tmp);
    free(w.taken);
    free(split);
    return rc;
}
