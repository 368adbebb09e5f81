/* A linear layer for a few rows, x [M, K] times w [N, K] transposed (see native.py, which builds this file).
 *
 * A batched decode step (Hogwild's workers, one row each) multiplies a few rows by every weight, so its time is
 * the time to read the weights once. torch's CPU GEMM reads them at ~60% of its one-row speed for 2-8 rows on
 * the benchmark CPU (1024x1024 float32, one thread: 250 us one row, 400 us four); this kernel streams each
 * block of NB weight rows once for all rows of x (265-297 us at two to four rows). One row is left to torch
 * (native.py), whose matrix-vector product reads as fast.
 * Writes out[m, n] = x[m] . w[n] (+ bias[n]) for m < M and n in [n0, n1); out rows are N apart. Returns 0.
 */
#include <stdint.h>
#include <string.h>

#define NB 6      /* weight rows a block: NB * MB accumulators stay in registers (4-8 measured within 5%) */
#define MB 4      /* rows of x a pass over the block */
#define AHEAD 12  /* prefetch distance in weight rows (6-16 measured alike) */

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float total(v16 v) {
    float half[8];
    for (int i = 0; i < 8; i++) half[i] = v[i] + v[i + 8];
    for (int i = 0; i < 4; i++) half[i] += half[i + 4];
    return (half[0] + half[2]) + (half[1] + half[3]);
}

/* out[m0 .. m0+mb, n .. n+nb] from weight rows wb (nb <= NB) and x rows m0.. (mb <= MB) */
static inline __attribute__((always_inline)) void block(const float *x, int64_t ldx, int64_t m0, int64_t mb,
                                                       int64_t K, const float *wb, int64_t nb, const float *bias,
                                                       float *out, int64_t N, int64_t n, int ahead) {
    const int64_t kv = K / 16 * 16;
    v16 acc[MB][NB];
    const float *xr[MB];
    for (int i = 0; i < MB; i++) {
        xr[i] = x + (m0 + (i < mb ? i : 0)) * ldx;
        for (int j = 0; j < NB; j++) acc[i][j] = (v16){0};
    }
    for (int64_t k = 0; k < kv; k += 16) {
        if (ahead)
            for (int j = 0; j < NB; j++) __builtin_prefetch(wb + (AHEAD + j) * K + k);
        v16 w[NB];
        for (int j = 0; j < NB; j++) w[j] = load(wb + (j < nb ? j : 0) * K + k);
        for (int i = 0; i < MB; i++) {
            const v16 xi = load(xr[i] + k);
            for (int j = 0; j < NB; j++) acc[i][j] += xi * w[j];
        }
    }
    for (int64_t i = 0; i < mb; i++)
        for (int64_t j = 0; j < nb; j++) {
            float s = total(acc[i][j]);
            for (int64_t k = kv; k < K; k++) s += xr[i][k] * wb[j * K + k];
            out[(m0 + i) * N + n + j] = s + (bias ? bias[n + j] : 0.0f);
        }
}

int kvtier_linear_rows_f32(const float *x, int64_t M, int64_t K, int64_t ldx, const float *w, const float *bias,
                           float *out, int64_t N, int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + NB <= n1; n += NB) {  /* whole blocks: nb a constant, so the compiler unrolls j */
        const int ahead = n + AHEAD + NB <= n1;  /* never prefetch past this call's weight rows */
        for (int64_t m0 = 0; m0 < M; m0 += MB)
            block(x, ldx, m0, M - m0 < MB ? M - m0 : MB, K, w + n * K, NB, bias, out, N, n, ahead);
    }
    if (n < n1)
        for (int64_t m0 = 0; m0 < M; m0 += MB)
            block(x, ldx, m0, M - m0 < MB ? M - m0 : MB, K, w + n * K, n1 - n, bias, out, N, n, 0);
    return 0;
}
