"""Decode attention of N workers over a cache of blocks, each worker with its own view (Hogwild! Inference,
arXiv 2504.06261).

Keys are stored once, rotated at block-local positions 0..len-1. Worker n sees block b with its first key at
some position of its view; `qrel[n, b]` is the query's position relative to that first key. Since RoPE
scores depend only on the distance between query and key, the query is turned once per block, to position
qrel[n, b] (it was rotated at q_pos[n]), instead of turning every key into every view:

    k:  | block 0 ........ | block 1 .... | block 2 ...... |      rows block_start[b] .. + block_len[b]
          0 1 2 ... len-1    0 1 ... len-1  0 1 ...           keys rotated at these local positions
    worker n:  q turned by qrel[n, b] - q_pos[n] for block b; sees key j iff j <= qrel[n, b]
               (and qrel[n, b] - j < window); qrel[n, b] = -1: block b is not in n's view

Each block's partial attention comes with its log-sum-exp, and the partials merge exactly
(`merge_partials`). The Triton kernel does the rotation, the visibility and the merge in one pass: an
online softmax per (worker, KV head) over the visible keys of every block, all query heads of a GQA
group together.
"""

from __future__ import annotations

import torch

from . import native
from ._triton import HAS_TRITON, use_triton
from .fused_attention import fused_attention, fused_available
from .partial_attention import merge_partials, partial_attention


def block_decode_attention_ref(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_start: torch.Tensor,
    block_len: torch.Tensor,
    qrel: torch.Tensor,
    inv_freq: torch.Tensor,
    interleaved: bool,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference of `block_decode_attention`: one `partial_attention` per block, on the query
    turned by `Rope.shift`, merged by log-sum-exp. Same arguments and results."""
    return _per_block(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, interleaved, scale, softcap, window,
                      fused=False)


def block_decode_attention(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_start: torch.Tensor,
    block_len: torch.Tensor,
    qrel: torch.Tensor,
    inv_freq: torch.Tensor,
    interleaved: bool,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    held: HeldKeys | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [N, Hq, D], worker n's query rotated (RoPE) at position q_pos[n] ([N] int32 or int64, as the other
          integer tensors);
    k, v: [Hkv, T, D], every block's keys/values end to end, keys rotated at block-local positions 0..len-1;
    block_start, block_len: [NB] (block b = rows block_start[b] .. +block_len[b] of k and v);
    qrel: [N, NB], the query's position relative to block b's first key in worker n's view
          (-1: block b is not in n's view). Key j of block b is visible to worker n iff j <= qrel[n, b]
          and, with a sliding window, qrel[n, b] - j < window.
    inv_freq: [R/2] float32 (R = rotary dim <= D; channels past R are not rotated), interleaved: pair layout
          (False: rotate-half pairs (i, i+R/2); True: pairs (2i, 2i+1)), as `kvtier.rope.Rope` holds them.
    For block b, worker n's query is turned by (qrel[n, b] - q_pos[n]) positions (a pure rotation: no
    attention scaling), so q.k sees the relative distance of the view.
    GQA: Hq = G * Hkv, query head h reads KV head h // G. `scale` multiplies q.k; `softcap` caps the scaled
    scores with softcap * tanh(s / softcap).
    Returns out [N, Hq, D] float32 and lse [N, Hq] float32 (natural log; -inf and out 0 for a worker that
    sees no key).

    Dispatch: the Triton kernel where it may run (CUDA, or the CPU interpreter); else on a CPU with kvtier's C
    kernel (float32, no soft-capping) the keys read in place (`_queries_turned_in_place`); else, for few held
    keys, one matmul of every block's turned queries over them (`_queries_turned`) or one attention call over
    every worker's turned copy of them (`_views_at_once`), and otherwise one fused attention call per block (the
    reference's own math where soft-capping leaves no fused kernel).
    held: `HeldKeys` of these very layout tensors and window, for a caller that attends many layers over one
    layout (it then derives the layout's bookkeeping once); made for this call when None."""
    _check(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, window)
    held = HeldKeys.check(held, q_pos, block_start, block_len, qrel, window)  # identities only: no device work
    if q.shape[0] and block_start.shape[0] and use_triton(q):
        return _block_decode_attention_triton(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, interleaved,
                                              scale, softcap, window)
    if q.shape[0] and block_start.shape[0] and softcap is None and held.count and native.takes(k, v):
        res = _queries_turned_in_place(q, k, v, inv_freq, interleaved, scale, held)
        if res is not None:
            return res
    if q.shape[0] and block_start.shape[0] and 0 < held.count * q.shape[0] * q.shape[1] * block_start.shape[0] \
            <= _SCORE_ELEMS:
        return _queries_turned(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, interleaved, scale, softcap,
                               window, held=held)
    if q.shape[0] and block_start.shape[0] and 0 < held.count * q.shape[0] * k.shape[0] * k.shape[2] <= _VIEW_ELEMS:
        return _views_at_once(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, interleaved, scale, softcap,
                              window, fused=fused_available(q, softcap), held=held)
    return _per_block(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, interleaved, scale, softcap, window,
                      fused=fused_available(q, softcap))


_VIEW_ELEMS = 1 << 22  # most float32 key elements `_views_at_once` turns (16 MiB): every worker's copy of the blocks
_SCORE_ELEMS = 1 << 20  # most scores `_queries_turned` computes (4 MiB): every query head x block x held key


def _queries_turned(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, interleaved, scale, softcap, window,
                    held: HeldKeys) -> tuple[torch.Tensor, torch.Tensor]:
    """Without a compiled kernel, for few held keys (the headers and the workers' current steps): each worker's
    query is turned once per block (N x blocks rows, where turning the keys made N copies of every key), all
    turned queries are scored against all held keys in one matmul, and each key keeps the score of its own
    block's turn. That scores every key once per block, a waste bounded by _SCORE_ELEMS, and on the benchmark
    CPU took about a quarter of the time of turning every worker's copy of the keys (`_views_at_once`)."""
    n, hq, d = q.shape
    hkv, nb = k.shape[0], block_start.shape[0]
    g = hq // hkv
    rows, mask, _ = held.layout(k.device)  # mask [N, 1, 1, T]
    t = rows.shape[0]
    rope, factors = held.query_turn(inv_freq, interleaved, d, k.device)
    turned = rope.shift_by(q.float()[:, :, None, :].expand(n, hq, nb, d), factors)  # [N, Hq, NB, D]
    turned = turned.view(n, hkv, g * nb, d).transpose(0, 1).reshape(hkv, n * g * nb, d)
    keys = k.index_select(1, rows).float()  # [Hkv, T, D]
    values = v.index_select(1, rows).float()
    scores = torch.bmm(turned, keys.transpose(1, 2)).mul_(scale).view(hkv, n, g, nb, t)
    own = held.key_blocks(k.device).view(1, 1, 1, 1, t).expand(hkv, n, g, 1, t)
    scores = scores.gather(3, own).view(hkv, n, g, t)  # each key scored by its own block's turn
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill_(~mask.view(1, n, 1, t), float("-inf"))
    top = scores.amax(-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).min)  # finite where nothing is seen
    weights = scores.sub_(top).exp_()  # 0 where unseen
    total = weights.sum(-1, keepdim=True)  # [Hkv, N, G, 1]
    out = torch.bmm(weights.view(hkv, n * g, t), values).view(hkv, n, g, d) / total.clamp(min=1.0)  # sums >= 1 if seen
    lse = (top + total.log()).view(hkv, n, g)  # -inf for a worker that sees no key
    return out.permute(1, 0, 2, 3).reshape(n, hq, d), lse.permute(1, 0, 2).reshape(n, hq)


def _queries_turned_in_place(q, k, v, inv_freq, interleaved, scale, held: HeldKeys
                             ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """On a CPU with kvtier's C kernel: each worker's query turned once per block (as `_queries_turned` turns
    it), then each (worker, KV head, block) one pair of `native.run_attention`, which reads the keys the worker
    sees in that block (one run of consecutive rows) in place; the blocks' partials merge by log-sum-exp. No key
    is copied or scored twice: in a four-worker step the matmul path's copies and its scoring of every key under
    every block's turn cost more than the attention itself. None without the C library, or for k, v whose
    heads are not rows of one storage (`native.arena_rows`)."""
    rows = native.arena_rows(k[None], v[None])
    if rows is None:
        return None
    krows, vrows, plane = rows
    n, hq, d = q.shape
    hkv, keys, _ = k.shape
    g, nb = hq // hkv, held.args[1].shape[0]
    rope, factors = held.query_turn(inv_freq, interleaved, d, k.device)
    turned = rope.shift_by(q.float()[:, :, None, :].expand(n, hq, nb, d), factors)  # [N, Hq, NB, D]
    pairs = turned.view(n, hkv, g, nb, d).transpose(2, 3).reshape(n * hkv * nb, g, d).contiguous()  # (n, h, b)
    first, count = held.runs(keys, plane, hkv)
    res = native.run_attention(pairs, krows, vrows, first, count, scale)
    if res is None:
        return None
    out, lse = res[0].view(n, hkv, nb, g, d), res[1].view(n, hkv, nb, g)
    total = torch.logsumexp(lse, 2)  # [N, Hkv, G]: -inf for a worker that sees no key
    weight = torch.exp(lse - total[:, :, None]).nan_to_num_(0.0)  # a block's share; 0 where nothing is seen
    out = (out * weight[..., None]).sum(2)  # [N, Hkv, G, D] (einsum measured 4x slower on these small shapes)
    return out.reshape(n, hq, d), total.reshape(n, hq)


def _views_at_once(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, interleaved, scale, softcap, window,
                   fused: bool, held: HeldKeys | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Without a compiled kernel, for few held keys (the workers' current steps): every worker gets its own
    copy of the blocks' keys, turned so that q.k sees the distance of its view (key j of block b moves by
    q_pos[n] - qrel[n, b], the inverse of the query's turn: a rotation preserves dot products), and one
    attention call with the workers as its batch covers all blocks; a per-block loop pays a call, a query
    turn and a log-sum-exp merge per block."""
    n = q.shape[0]
    held = HeldKeys.check(held, q_pos, block_start, block_len, qrel, window)
    rows, mask, _ = held.layout(k.device)
    rope, factors = held.turn(inv_freq, interleaved, k.shape[-1], k.device)
    turned = rope.shift_by(k[:, rows].float()[None].expand(n, -1, -1, -1), factors)  # [N, Hkv, T, D]
    values = v[:, rows].float()[None].expand(n, -1, -1, -1)
    qn = q.float().unsqueeze(2)  # [N, Hq, 1, D]
    res = fused_attention(qn, turned, values, scale, mask) if fused else None
    if res is None:
        res = partial_attention(qn, turned, values, scale, mask, softcap)
    return res[0].squeeze(2), res[1].squeeze(2)


class HeldKeys:
    """What the CPU path for few held keys derives from a call's block layout, the same at every layer over
    that layout: how many keys are held (one host sync), which rows, which of them each worker sees, how far
    each moves in a worker's copy, and that turn's factors. A Hogwild forward pass builds one per window and
    hands it to every layer's call, so the layers after the first skip the bookkeeping."""

    def __init__(self, q_pos: torch.Tensor, block_start: torch.Tensor, block_len: torch.Tensor, qrel: torch.Tensor,
                 window: int | None):
        self.args = (q_pos, block_start, block_len, qrel, window)
        self._count: int | None = None
        self._layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._turns: dict[tuple, tuple] = {}
        self._blocks: torch.Tensor | None = None
        self._runs: tuple[tuple[int, int, int], torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def check(cls, held: HeldKeys | None, q_pos, block_start, block_len, qrel, window) -> HeldKeys:
        """`held` if it was made for these very tensors and window, a new one if None; else ValueError."""
        if held is None:
            return cls(q_pos, block_start, block_len, qrel, window)
        if not (all(a is b for a, b in zip(held.args[:4], (q_pos, block_start, block_len, qrel)))
                and held.args[4] == window):
            raise ValueError("block_decode_attention: `held` was made for other layout tensors or another window")
        return held

    @property
    def count(self) -> int:
        """Keys held by all blocks together."""
        if self._count is None:
            self._count = int(self.args[2].sum()) if self.args[2].numel() else 0
        return self._count

    def layout(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows [T] long (held key rows of k and v), mask [N, 1, 1, T] bool (key visible to worker n) and
        delta [N, T] (positions key t moves by in worker n's copy)."""
        if self._layout is None:
            q_pos, block_start, block_len, qrel, window = self.args
            starts, lens = block_start.tolist(), block_len.tolist()
            rows = torch.cat([torch.arange(a, a + m) for a, m in zip(starts, lens)]).to(device)
            lens_t = torch.tensor(lens)
            block = torch.repeat_interleave(torch.arange(len(lens)), lens_t).to(device)  # each held key's block
            local = rows - torch.repeat_interleave(block_start.to(device), lens_t.to(device))  # its index j in it
            rel = qrel.to(device)[:, block]  # [N, T]: each worker's query position relative to each key's block
            seen = (rel >= 0) & (local[None, :] <= rel)
            if window is not None:
                seen &= rel - local[None, :] < window
            self._layout = rows, seen[:, None, None, :], q_pos.to(device)[:, None] - rel
            self._blocks = block
        return self._layout

    def runs(self, keys: int, plane: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """first, count [N * heads * NB, 1] int64 (CPU): the keys worker n sees in block b, for KV head h, as one
        run of rows of k, v [heads, keys, D] whose head h starts at row h * plane of their storage
        (`native.arena_rows`): keys j <= qrel[n, b] of the block, and with a window the last `window` of them,
        consecutive. Count 0 where the worker sees none."""
        if self._runs is None or self._runs[0] != (keys, plane, heads):
            _, block_start, block_len, qrel, window = self.args
            start, length, rel = block_start.long().cpu(), block_len.long().cpu(), qrel.long().cpu()
            if bool(((start < 0) | (length < 0) | (start + length > keys)).any()):
                raise ValueError(f"block_decode_attention: blocks (start {start.tolist()}, length {length.tolist()}) "
                                 f"must lie inside the {keys} rows of k and v")
            hi = torch.minimum(rel + 1, length[None])  # [N, NB]: past the last key seen
            lo = torch.zeros_like(hi) if window is None else (rel - window + 1).clamp(min=0)
            count = (hi - lo).clamp(min=0)
            first = torch.where(count > 0, start[None] + lo, 0)
            first = first[:, None, :] + torch.arange(heads)[None, :, None] * plane  # [N, heads, NB]
            count = count[:, None, :].expand(-1, heads, -1)
            self._runs = (keys, plane, heads), first.reshape(-1, 1).contiguous(), count.reshape(-1, 1).contiguous()
        return self._runs[1], self._runs[2]

    def key_blocks(self, device: torch.device) -> torch.Tensor:
        """[T] long: the block each held key belongs to."""
        self.layout(device)
        return self._blocks

    def query_turn(self, inv_freq: torch.Tensor, interleaved: bool, width: int, device: torch.device):
        """(Rope, factors) of the turn of each worker's query to each block, qrel - q_pos ([N, NB]), for queries
        laid out [N, Hq, NB, width]."""
        q_pos, _, _, qrel, _ = self.args
        return self._turn("query", lambda: qrel.to(device) - q_pos.to(device)[:, None], inv_freq, interleaved,
                          width, device)

    def turn(self, inv_freq: torch.Tensor, interleaved: bool, width: int, device: torch.device):
        """(Rope, factors) of this layout's turn of keys of `width` channels under these frequencies."""
        return self._turn("keys", lambda: self.layout(device)[2], inv_freq, interleaved, width, device)

    def _turn(self, what: str, delta, inv_freq: torch.Tensor, interleaved: bool, width: int, device: torch.device):
        """(Rope, factors) for the positions delta() returns, made once per `what` and frequencies."""
        from ..rope import Rope  # see `_per_block`

        key = (what, id(inv_freq), interleaved, width)
        hit = self._turns.get(key)
        if hit is None or hit[0] is not inv_freq:
            rope = Rope(inv_freq.float(), interleaved=interleaved)
            hit = self._turns[key] = (inv_freq, rope, rope.shift_factors(delta(), width, device))
        return hit[1], hit[2]


def _per_block(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, interleaved, scale, softcap, window,
               fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, hq, d = q.shape
    out = torch.zeros(n, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((n, hq), float("-inf"), dtype=torch.float32, device=q.device)
    if n == 0:
        return out, lse
    # Imported here, not at the top: transformers probes for a hub package named `kernels` with a real import,
    # which from the repository root finds this folder as a top-level package, where `..rope` cannot resolve.
    from ..rope import Rope

    rope = Rope(inv_freq.float(), interleaved=interleaved)
    # Workers become the query rows of one batch-1 call per block: x [1, Hq, N, D], delta [N] per row.
    qrows = q.float().permute(1, 0, 2).unsqueeze(0)  # [1, Hq, N, D]
    qrel, q_pos = qrel.to(q.device), q_pos.to(q.device)
    starts, lens = block_start.tolist(), block_len.tolist()  # block layout: host ints to slice with
    for b, (start, length) in enumerate(zip(starts, lens)):
        rel = qrel[:, b]  # [N]
        if length == 0:
            continue
        qb = rope.shift(qrows, rel - q_pos)  # [1, Hq, N, D] float32: q at position rel[n]
        j = torch.arange(length, device=q.device)
        seen = j[None, :] <= rel[:, None]  # [N, len]
        if window is not None:
            seen &= rel[:, None] - j[None, :] < window
        kb = k[None, :, start:start + length]  # [1, Hkv, len, D]
        vb = v[None, :, start:start + length]
        mask = seen[None, None]  # [1, 1, N, len]
        res = None
        if fused:
            res = fused_attention(qb, kb.float(), vb.float(), scale, mask)
        if res is None:
            res = partial_attention(qb, kb, vb, scale, mask, softcap)
        ob, lb = res[0][0].permute(1, 0, 2), res[1][0].permute(1, 0)  # [N, Hq, D], [N, Hq]
        out, lse = merge_partials(out, lse, ob, lb)
    return out, lse


def _check(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, window) -> None:
    """Shapes only (no device sync): a wrong layout fails here with a message, not deep inside a kernel."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"block_decode_attention wants q [N, Hq, D] and k, v [Hkv, T, D] of one shape; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    n, hq, d = q.shape
    hkv, _, dk = k.shape
    if dk != d or hkv == 0 or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: head_dim must match and Hq be a multiple of Hkv")
    nb = block_start.shape[0]
    if block_start.shape != (nb,) or block_len.shape != (nb,) or qrel.shape != (n, nb) or q_pos.shape != (n,):
        raise ValueError(f"block_start and block_len want [NB], qrel [N, NB], q_pos [N]; got {tuple(block_start.shape)}, "
                         f"{tuple(block_len.shape)}, {tuple(qrel.shape)}, {tuple(q_pos.shape)} for N={n}")
    if inv_freq.dim() != 1 or 2 * inv_freq.shape[0] > d:
        raise ValueError(f"inv_freq wants [R/2] with R <= head_dim {d}; got {tuple(inv_freq.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be None or at least 1; got {window}")



if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _block_decode_kernel(
        q_ptr, qpos_ptr, k_ptr, v_ptr, bstart_ptr, blen_ptr, qrel_ptr, freq_ptr, out_ptr, lse_ptr,
        scale, softcap, window, D, HALF, NB,
        sq_n, sq_h, sk_h, sk_t, sv_h, sv_t, sr_n, so_n, so_h, so_s, sl_n, sl_h,
        HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        SPLITS: tl.constexpr, INTERLEAVED: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
    ):
        # one program: one (worker, KV head), all G query heads of its group, and split `split` of every block's
        # visible keys; the query is turned per block, an online softmax runs over all blocks' keys
        pid = tl.program_id(0)
        split = tl.program_id(1)
        n = pid // HKV
        h = pid % HKV
        k_head = k_ptr + h.to(tl.int64) * sk_h  # int64: a long cache's head offset passes 2**31 elements
        v_head = v_ptr + h.to(tl.int64) * sv_h
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        gmask = offs_g < G
        dmask = offs_d < D
        # Each rotated channel c turns with its pair partner p(c) through frequency f(c):
        #   c' = c * cos - p(c) * sin (first of the pair), c * cos + p(c) * sin (second); channels past R pass.
        if INTERLEAVED:
            first = offs_d % 2 == 0
            fidx = offs_d // 2
            partner = tl.where(first, offs_d + 1, offs_d - 1)
        else:
            first = offs_d < HALF
            fidx = tl.where(first, offs_d, offs_d - HALF)
            partner = tl.where(first, offs_d + HALF, offs_d - HALF)
        rot = offs_d < 2 * HALF
        freq = tl.load(freq_ptr + fidx, mask=rot, other=0.0)  # 0 past R: cos 1, and sign 0 drops the partner
        sign = tl.where(rot, tl.where(first, -1.0, 1.0), 0.0)
        partner = tl.where(rot, partner, offs_d)
        rows = q_ptr + n * sq_n + (h * G + offs_g)[:, None] * sq_h
        qmask = gmask[:, None] & dmask[None, :]
        q = tl.load(rows + offs_d[None, :], mask=qmask, other=0.0).to(tl.float32)  # [G, D]
        qp = tl.load(rows + partner[None, :], mask=qmask, other=0.0).to(tl.float32)  # q's pair partners
        qpos = tl.load(qpos_ptr + n)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for b in range(NB):
            rel = tl.load(qrel_ptr + n * sr_n + b)
            start = tl.load(bstart_ptr + b)
            hi = tl.minimum(tl.load(blen_ptr + b), rel + 1)  # keys j <= rel
            lo = 0
            if WINDOW:
                lo = tl.maximum(rel - window + 1, 0)  # and rel - j < window
            if SPLITS > 1:  # this program's share of the block's visible keys, whole tiles
                per = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), SPLITS), BLOCK_N) * BLOCK_N
                lo = lo + split * per
                hi = tl.minimum(hi, lo + per)
            ang = (rel - qpos).to(tl.float32) * freq  # [D]: the query moves from q_pos to rel
            qr = q * tl.cos(ang)[None, :] + qp * (sign * tl.sin(ang))[None, :]  # [G, D]
            for s0 in range(lo, hi, BLOCK_N):
                offs_n = s0 + tl.arange(0, BLOCK_N)
                nmask = offs_n < hi
                row = (start + offs_n).to(tl.int64)
                kv_mask = nmask[:, None] & dmask[None, :]
                kb = tl.load(k_head + row[:, None] * sk_t + offs_d[None, :], mask=kv_mask,
                             other=0.0).to(tl.float32)  # [N, D]
                vb = tl.load(v_head + row[:, None] * sv_t + offs_d[None, :], mask=kv_mask,
                             other=0.0).to(tl.float32)
                sc = tl.sum(qr[:, None, :] * kb[None, :, :], axis=2) * scale  # [G, N]
                if SOFTCAP:
                    sc = softcap * (2.0 * tl.sigmoid(2.0 * sc / softcap) - 1.0)  # softcap * tanh(sc / softcap)
                sc = tl.where(nmask[None, :], sc, float("-inf"))
                m_new = tl.maximum(m, tl.max(sc, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(sc - m_safe[:, None])
                alpha = tl.exp(m - m_safe)
                l = l * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vb[None, :, :], axis=1)
                m = m_new
        empty = l == 0.0
        out = acc / tl.where(empty, 1.0, l)[:, None]
        lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l)))
        heads = (h * G + offs_g).to(tl.int64)
        tl.store(out_ptr + n * so_n + heads[:, None] * so_h + split * so_s + offs_d[None, :], out, mask=qmask)
        tl.store(lse_ptr + n * sl_n + heads * sl_h + split, lse, mask=gmask)

    def _splits(q: torch.Tensor, n: int, hkv: int, t: int) -> int:
        """Key splits per (worker, KV head): enough programs to fill the GPU twice over when N * Hkv alone does
        not, each split at least 512 keys; one under the interpreter."""
        if not q.is_cuda:
            return 1
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        return max(1, min(-(-2 * sms // (n * hkv)), t // 512, 64))

    def _block_decode_attention_triton(q, q_pos, k, v, block_start, block_len, qrel, inv_freq, interleaved, scale,
                                       softcap, window, splits: int | None = None):
        n, hq, d = q.shape
        hkv, t, _ = k.shape
        g = hq // hkv
        k = k if k.stride(2) == 1 else k.contiguous()  # the kernel walks rows by stride, channels by one
        v = v if v.stride(2) == 1 else v.contiguous()
        splits = splits or _splits(q, n, hkv, t)
        dev = q.device
        q = q.contiguous()
        i32 = {"device": dev, "dtype": torch.int32}
        q_pos, qrel = q_pos.to(**i32).contiguous(), qrel.to(**i32).contiguous()
        block_start, block_len = block_start.to(**i32).contiguous(), block_len.to(**i32).contiguous()
        freq = inv_freq.to(device=dev, dtype=torch.float32).contiguous()
        out = torch.empty(n, hq, splits, d, dtype=torch.float32, device=dev)
        lse = torch.empty(n, hq, splits, dtype=torch.float32, device=dev)
        block_g = triton.next_power_of_2(g)
        block_d = triton.next_power_of_2(d)
        # The [G, N, D] product tile stays within 16k elements: at 8 warps ptxas (sm_90) then keeps every shape
        # from G*D = 64 to 2048 in registers without spills.
        block_n = max(16, min(64, 16384 // (block_g * block_d)))
        warps = 8 if block_g * block_n * block_d >= 8192 else 4
        _block_decode_kernel[(n * hkv, splits)](
            q, q_pos, k, v, block_start, block_len, qrel, freq, out, lse,
            float(scale), float(softcap or 1.0), int(window or 1), d, freq.numel(), block_start.numel(),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), qrel.stride(0),
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            HKV=hkv, G=g, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d, SPLITS=splits,
            INTERLEAVED=bool(interleaved), SOFTCAP=softcap is not None, WINDOW=window is not None, num_warps=warps,
        )
        if splits == 1:
            return out[:, :, 0], lse[:, :, 0]
        return _merge_splits(out, lse)

    def _merge_splits(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """out [N, Hq, S, D], lse [N, Hq, S] -> the log-sum-exp mix over S (a split that saw nothing drops out)."""
        total = torch.logsumexp(lse, -1)  # [N, Hq]; -inf where no split saw a key
        w = torch.exp(lse - torch.where(torch.isfinite(total), total, 0.0)[..., None])  # [N, Hq, S]
        return (out * w[..., None]).sum(2), total
