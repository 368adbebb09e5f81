/* Row copies from a block into a CPU arena's scattered slots (see native.py, which builds this file): the
 * arena is `planes` planes (batch row x KV head) of `plane_rows` rows of `row_bytes` each; the block holds n
 * rows per plane, in the order idx lists their slots. torch's index_copy_ along the slot dimension took 2.5-3.3x
 * these plain row copies' time on the benchmark CPU (64-1300 rows in 2-40 runs; in a 32k tiered step 44 -> 18
 * ms over 10 steps). The reverse, a gather, was no faster than index_select in the step, so it is not here.
 * Returns 0, or -2 without copying anything where a slot lies outside [0, plane_rows). */
#include <stdint.h>
#include <string.h>

static int slots_inside(const int64_t *idx, int64_t n, int64_t plane_rows) {
    for (int64_t i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= plane_rows) return 0;
    return 1;
}

/* arena[b, h, idx[i]] = block[b, h, i], for h < heads: block rows at b * sb + h * sh + i * sn bytes (a view,
 * such as a slice of a decoded record: no copy to make it dense first). */
int kvtier_scatter_rows(const char *block, int64_t sb, int64_t sh, int64_t sn, char *arena, const int64_t *idx,
                        int64_t n, int64_t planes, int64_t heads, int64_t plane_rows, int64_t row_bytes) {
    if (!slots_inside(idx, n, plane_rows)) return -2;
    for (int64_t p = 0; p < planes; p++) {
        const char *src = block + (p / heads) * sb + (p % heads) * sh;
        char *dst = arena + p * plane_rows * row_bytes;
        for (int64_t i = 0; i < n; i++) memcpy(dst + idx[i] * row_bytes, src + i * sn, (size_t)row_bytes);
    }
    return 0;
}

#if defined(__AVX__)
#include <immintrin.h>
#endif

/* n bytes from src to dst, dst written with non-temporal (streaming) stores where the CPU has them: a bulk
 * write into memory that will not be read again soon skips reading each destination line first (on the
 * benchmark CPU 18.6 against 12.6 GB/s for 16 KiB pieces into a large arena). */
static void stream_copy(char *dst, const char *src, int64_t n) {
#if defined(__AVX__)
    int64_t head = (int64_t)((32 - ((uintptr_t)dst & 31)) & 31);
    if (head > n) head = n;
    memcpy(dst, src, (size_t)head);
    int64_t i = head;
    for (; i + 32 <= n; i += 32)
        _mm256_stream_si256((__m256i *)(dst + i), _mm256_loadu_si256((const __m256i *)(src + i)));
    memcpy(dst + i, src + i, (size_t)(n - i));
#else
    memcpy(dst, src, (size_t)n);
#endif
}

/* planes x plane_bytes from src (planes src_stride bytes apart) to dst (dst_stride apart): a record's
 * [batch x heads] runs of rows into their runs of arena slots, streamed past the CPU cache. Returns 0. */
int kvtier_stream_planes(char *dst, int64_t dst_stride, const char *src, int64_t src_stride, int64_t planes,
                         int64_t plane_bytes) {
    for (int64_t p = 0; p < planes; p++) stream_copy(dst + p * dst_stride, src + p * src_stride, plane_bytes);
#if defined(__AVX__)
    _mm_sfence(); /* streamed stores are weakly ordered: visible before this returns */
#endif
    return 0;
}
