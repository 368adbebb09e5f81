/* The Quest-bound page selection select_pages.c defines, declared for run_attention.c's one-call sparse step
 * (and checked against its definition there). select_pages.c says what it computes and returns. */
#ifndef KVTIER_SELECT_PAGES_H
#define KVTIER_SELECT_PAGES_H
#include <stdint.h>

int kvtier_select_pages_f32(const float *q, int64_t b_n, int64_t hkv, int64_t g_n, int64_t d, const void *kmin,
                            const void *kmax, int64_t kb, int64_t kh, int64_t half, int64_t c_n, const float *pmin,
                            const float *pmax, int64_t pb, int64_t ph, int64_t p_n, const int64_t *length,
                            const int64_t *first, const int64_t *count, const int64_t *page_len,
                            const int64_t *chunk_of, const int64_t *page_off, const uint8_t *forced,
                            const uint8_t *has_tokens, int64_t budget, int64_t candidates, int64_t shared,
                            int64_t pair_lo, int64_t pair_hi, int64_t *whole, int64_t *n_whole, int64_t *parts,
                            int64_t *n_parts, uint8_t *chunk_sel, int64_t *unit_chunk, int64_t *unit_off,
                            int64_t *unit_size);

#endif
