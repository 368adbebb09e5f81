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

static void attend_pair(const float *q, const float *k, const float *v, const int64_t *first,
                        const int64_t *count, int64_t units, int64_t g_n, int64_t d, float scale,
                        float *out, float *lse, float *scores /* [g_n * BLOCK] */, float *top /* [g_n] */,
                        float *sum /* [g_n] */) {
    for (int64_t g = 0; g < g_n; g++) {
        top[g] = -INFINITY;
        sum[g] = 0.0f;
        for (int64_t j = 0; j < d; j++) out[g * d + j] = 0.0f;
    }
    for (int64_t u = 0; u < units; u++) {
        const int64_t run_first = first[u], run_rows = count[u];
        for (int64_t b0 = 0; b0 < run_rows; b0 += BLOCK) {
            const int64_t n = run_rows - b0 < BLOCK ? run_rows - b0 : BLOCK;
            const float *kb = k + (run_first + b0) * d, *vb = v + (run_first + b0) * d;
            for (int64_t i = 0; i < n; i++) {
                const float *kr = kb + i * d;
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

/* Pairs [pair_lo, pair_hi) of the whole problem: callers split the pairs across threads. `work` holds
 * g_n * (BLOCK + 2) floats for this caller alone. Returns 0. */
int kvtier_run_attention_f32(const float *q, const float *k, const float *v, const int64_t *first,
                             const int64_t *count, int64_t pair_lo, int64_t pair_hi, int64_t units, int64_t g_n,
                             int64_t d, float scale, float *out, float *lse, float *work) {
    float *scores = work, *top = work + g_n * BLOCK, *sum = top + g_n;
    for (int64_t bh = pair_lo; bh < pair_hi; bh++)
        attend_pair(q + bh * g_n * d, k, v, first + bh * units, count + bh * units, units, g_n, d, scale,
                    out + bh * g_n * d, lse + bh * g_n, scores, top, sum);
    return 0;
}
