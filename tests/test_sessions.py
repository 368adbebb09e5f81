"""Saved sessions: prefill once, reopen in a new process, answer without a new prefill, and fail clearly
on another model, dtype, layout version, an interrupted prefill, a second opener or a damaged record."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import re
import struct
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
import torch
from conftest import build_model, twin
from helpers import cache_kw

from kvtier import (
    CacheInputError,
    IncompleteSessionError,
    KVTierCache,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
    StoreMissingRecordError,
)
from kvtier.store.codec import RecordCodec
from kvtier.store.disk import DiskStore

WORKER = str(Path(__file__).with_name("session_worker.py"))
CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=40, host_budget=32)


def worker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"worker {args[0]} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def ids_arg(ids: torch.Tensor) -> str:
    return ",".join(map(str, ids[0].tolist()))


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory):
    """A llama saved to disk, and a document prefilled and saved by another process."""
    root = tmp_path_factory.mktemp("saved")
    model = build_model("llama")
    model.save_pretrained(root / "model")
    doc = torch.randint(3, 128, (1, 230), generator=torch.Generator().manual_seed(5))
    out = worker("prefill", str(root / "model"), str(root / "store"), "--ids", ids_arg(doc))
    assert "SAVED 230" in out.stdout
    return model, root / "model", root / "store", doc


@pytest.fixture
def saved(saved_once, tmp_path):
    """A private copy of the saved store (tests damage or reopen it)."""
    model, model_dir, store, doc = saved_once
    shutil.copytree(store, tmp_path / "store")
    return model, model_dir, tmp_path / "store", doc


def one_shot(model, ids: torch.Tensor, n: int) -> list[int]:
    out = twin(model).generate(input_ids=ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_reopened_session_answers_like_a_one_shot_run(saved):
    model, model_dir, store, doc = saved
    for seed in (11, 12):  # two different questions from the same saved prefix
        question = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(seed))
        ids = torch.cat([doc, question], dim=1)
        out = worker("answer", str(model_dir), str(store), "--ids", ids_arg(ids), "--new-tokens", "10")
        tokens = [int(t) for t in out.stdout.split("TOKENS ")[1].split(",")]
        assert tokens == one_shot(model, ids, 10)


def test_reopen_in_process_keeps_the_saved_prefix(saved):
    model, _, store, doc = saved
    m = twin(model)
    cache = KVTierCache.open(store, m)
    assert cache.get_seq_length() == 230
    s = cache.stats()
    assert s.disk.tokens >= 200 and s.device.tokens <= 40 * 4
    ids = torch.cat([doc, torch.tensor([[5, 6, 7]])], dim=1)
    out = m.generate(input_ids=ids, max_new_tokens=6, do_sample=False, **{cache_kw(m): cache})
    assert out[0, ids.shape[1]:].tolist() == one_shot(model, ids, 6)
    cache.close()
    # Continuing did not change the saved session: it still holds exactly the document.
    again = KVTierCache.open(store, twin(model))
    assert again.get_seq_length() == 230
    again.close()


def test_saving_a_batch_with_padding_and_spilled_chunks(tmp_path):
    model = build_model("qwen2")  # mixes full (tiered) and sliding layers
    m = twin(model)
    from helpers import padded_batch, step_logits

    ids, mask = padded_batch([120, 95])
    cache = KVTierCache.for_model(m, store_path=tmp_path / "s", **CHUNKING)
    step_logits(m, cache, ids, mask, [ids.shape[1]], [])
    cache.save()
    cache.close()
    cache = KVTierCache.open(tmp_path / "s", m)
    full_ids = torch.cat([ids, torch.tensor([[9, 10], [11, 12]])], 1)
    full_mask = torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], 1)
    out = m.generate(input_ids=full_ids, attention_mask=full_mask, max_new_tokens=8, do_sample=False,
                     **{cache_kw(m): cache})
    ref = twin(model).generate(input_ids=full_ids, attention_mask=full_mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref)
    cache.close()


def test_other_model_is_refused(saved):
    _, _, store, _ = saved
    with pytest.raises(StoreMismatchError, match="another model"):
        KVTierCache.open(store, build_model("llama", seed=1))
    with pytest.raises(StoreMismatchError, match="model_type"):
        KVTierCache.open(store, build_model("qwen3"))


def _same_weights(model, **changes):
    """The model's weights under a config with `changes`: another forward pass from the same tensors."""
    config = copy.deepcopy(model.config)
    for key, value in changes.items():
        setattr(config, key, value)
    other = type(model)(config).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("changes, says", [
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}), "forward.rope_theta: store 10000.0 vs "
                                                                        "model 1000000.0"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
     "forward.factor: store None vs model 4.0"),
    (dict(rms_norm_eps=0.1), "forward.rms_norm_eps"),
    (dict(hidden_act="gelu"), "forward.hidden_act"),
])
def test_the_same_weights_under_other_settings_are_refused(saved, changes, says):
    """Keys are stored rotated and every layer's K and V depend on the norms and activations before it: the
    same weights under another RoPE or eps compute other KV (a session opened so gave other tokens)."""
    model, _, store, _ = saved
    with pytest.raises(StoreMismatchError, match=re.escape(says)):
        KVTierCache.open(store, _same_weights(model, **changes))


def test_weights_changed_past_the_first_values_are_refused(saved):
    """Rows of one projection changed, its first row (the first 64 values) left alone: a fine-tune of some rows
    (new tokens' embeddings, say) is another model."""
    model, _, store, _ = saved
    other = twin(model)
    with torch.no_grad():
        weight = other.model.layers[1].self_attn.v_proj.weight
        weight[5:9] += 0.25
    with pytest.raises(StoreMismatchError, match="same architecture and settings, different weights"):
        KVTierCache.open(store, other)
    with torch.no_grad():  # one input feature (a column) changed in every row
        other = twin(model)
        other.model.layers[0].mlp.down_proj.weight[:, 7] *= 1.5
    with pytest.raises(StoreMismatchError, match="different weights"):
        KVTierCache.open(store, other)


def test_a_store_signed_by_an_older_signature_says_so(saved, tmp_path):
    model, _, store, _ = saved
    shutil.copytree(store, tmp_path / "s")
    disk = DiskStore(tmp_path / "s", create=False)
    header = disk.get_meta("store")
    header["signature"] = "0" * 64
    del header["structure"]["signature_version"]
    disk.put_meta("store", header)
    disk.close()
    with pytest.raises(StoreMismatchError, match="model signature covers other things .version 1, this kvtier's is "):
        KVTierCache.open(tmp_path / "s", twin(model))


def test_other_dtype_is_refused(saved):
    model, _, store, _ = saved
    with pytest.raises(StoreMismatchError, match="dtype float32.*bfloat16"):
        KVTierCache.open(store, twin(model).to(torch.bfloat16))


def test_other_layout_version_is_refused(saved):
    model, _, store, _ = saved
    disk = DiskStore(store, create=False)
    header = disk.get_meta("store")
    header["layout_version"] = 99
    disk.put_meta("store", header)
    disk.close()
    with pytest.raises(StoreMismatchError, match="layout version 99"):
        KVTierCache.open(store, twin(model))


def test_second_process_is_refused(saved):
    model, model_dir, store, doc = saved
    cache = KVTierCache.open(store, twin(model))
    out = worker("answer", str(model_dir), str(store), "--ids", ids_arg(doc), check=False)
    assert out.returncode != 0 and "StoreLockedError" in out.stderr and "already open" in out.stderr
    with pytest.raises(StoreLockedError):
        KVTierCache.open(store, twin(model))
    cache.close()


@pytest.mark.parametrize("kill", [False, True], ids=["keyboard-interrupt", "sigkill"])
def test_interrupted_prefill_leaves_a_readable_store_marked_incomplete(tmp_path, kill):
    model = build_model("llama")
    model.save_pretrained(tmp_path / "model")
    doc = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(5))
    args = ["prefill", str(tmp_path / "model"), str(tmp_path / "store"), "--ids", ids_arg(doc), "--interrupt-layer", "2"]
    out = worker(*args, *(["--kill"] if kill else []), check=False)
    assert out.returncode != 0
    with pytest.raises(IncompleteSessionError, match="interrupted"):
        KVTierCache.open(tmp_path / "store", twin(model))
    # The store itself is intact: every record written before the interrupt decodes and checks out.
    disk = DiskStore(tmp_path / "store", create=False)
    keys = list(disk.keys())
    assert keys, "layers 0-1 spilled chunks to disk before the interrupt"
    codec = RecordCodec()
    sig = bytes.fromhex(disk.get_meta("store")["signature"])
    for key in keys:
        header = codec.read_header(disk.get(key), "record")
        k, _ = codec.decode(disk.get(key), dataclasses.replace(header, signature=sig))
        assert k.dtype == torch.float32
    assert disk.get_meta("session")["state"] == "incomplete"
    disk.close()
    # Starting over on the same path works with overwrite=True.
    cache = KVTierCache.for_model(twin(model), store_path=tmp_path / "store", overwrite=True, **CHUNKING)
    cache.close()


def test_interrupted_forward_cannot_be_saved(tmp_path):
    model = twin(build_model("llama"))
    cache = KVTierCache.for_model(model, store_path=tmp_path / "s", **CHUNKING)
    hook = model.model.layers[2].register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(input_ids=torch.randint(3, 128, (1, 100)), **{cache_kw(model): cache})
    hook.remove()
    with pytest.raises(IncompleteSessionError, match="did not finish"):
        cache.save()
    cache.close()
    with pytest.raises(IncompleteSessionError):
        KVTierCache.open(tmp_path / "s", model)


@pytest.mark.parametrize("how", ["never fed", "reset", "cropped to nothing"])
def test_a_cache_holding_no_tokens_cannot_replace_the_saved_session(saved, tmp_path, how):
    """A reopened session reset (or cropped to nothing) and saved wrote a manifest of batch -1: the session was lost
    and the store read as damaged."""
    model, _, store, _ = saved
    shutil.copytree(store, tmp_path / "s")
    m = twin(model)
    if how == "never fed":
        cache = KVTierCache.for_model(m, store_path=tmp_path / "fresh", **CHUNKING)
    else:
        cache = KVTierCache.open(tmp_path / "s", m)
        cache.reset() if how == "reset" else cache.crop(-cache.get_seq_length())
    with pytest.raises(CacheInputError, match="holds no tokens"):
        cache.save()
    cache.close()
    if how != "never fed":
        with KVTierCache.open(tmp_path / "s", twin(model)) as again:
            assert again.get_seq_length() > 0


def _damage(store: Path, mutate) -> str:
    env = lmdb.open(str(store), max_dbs=4)
    db = env.open_db(b"chunks")
    with env.begin(write=True, db=db) as txn:
        key, value = next(iter(txn.cursor()))
        mutate(txn, key, bytes(value))
    env.close()
    layer, chunk = struct.unpack(">IQ", key[1:])
    return f"layer {layer} chunk {chunk}"


def test_corrupted_record_names_the_chunk(saved):
    model, _, store, doc = saved

    def flip(txn, key, value):
        damaged = bytearray(value)
        damaged[-3] ^= 0x5A
        txn.put(key, bytes(damaged))

    name = _damage(store, flip)
    m = twin(model)
    with pytest.raises((StoreCorruptError, StoreMissingRecordError), match=name):
        cache = KVTierCache.open(store, m)
        m.generate(input_ids=torch.cat([doc, doc[:, :3]], 1), max_new_tokens=3, **{cache_kw(m): cache})


def test_truncated_record_names_the_chunk(saved):
    model, _, store, doc = saved
    name = _damage(store, lambda txn, key, value: txn.put(key, value[: len(value) // 2]))
    m = twin(model)
    with pytest.raises(StoreCorruptError, match=f"{name}.*truncated"):
        cache = KVTierCache.open(store, m)
        m.generate(input_ids=torch.cat([doc, doc[:, :3]], 1), max_new_tokens=3, **{cache_kw(m): cache})


def test_missing_record_names_the_chunk(saved):
    model, _, store, doc = saved
    name = _damage(store, lambda txn, key, value: txn.delete(key))
    m = twin(model)
    with pytest.raises(StoreMissingRecordError, match=name):
        cache = KVTierCache.open(store, m)
        m.generate(input_ids=torch.cat([doc, doc[:, :3]], 1), max_new_tokens=3, **{cache_kw(m): cache})


def test_store_path_guards(tmp_path, saved):
    model, _, store, _ = saved
    with pytest.raises(StoreError, match="already holds data"):
        KVTierCache.for_model(twin(model), store_path=store)
    cache = KVTierCache.for_model(twin(model))
    with pytest.raises(StoreError, match="temporary store"):
        cache.save()
    cache.close()


def test_warm_fills_free_room_after_open(saved):
    model, _, store, _ = saved
    cache = KVTierCache.open(store, twin(model), device_budget=120, host_budget=64)
    assert cache.stats().device.tokens < 4 * 60
    moved = cache.warm()
    s = cache.stats()
    assert moved > 0 and s.device.tokens > 4 * 100 and s.host.tokens > 0
    assert s.device.peak_tokens <= 120 and s.host.peak_tokens <= 64
    cache.close()


@pytest.mark.parametrize("op, kept", [
    (lambda c: c.crop(-10), 30), (lambda c: c.crop(33), 33), (lambda c: c.remove_span(36, 40), 36),
    (lambda c: c.warm(), 40)], ids=["crop-back", "crop-to", "remove-span", "warm"])
def test_a_session_with_nothing_on_the_device_reopens_for_every_operation(tmp_path, op, kept):
    """Every token sealed in chunks (no recent window) left the reopened arena without a shape: a crop inside a
    chunk raised an AttributeError with some layers cut (the next pass off by 0.05, with no error), and
    remove_span and warm() raised too."""
    model, ref_model = build_model("llama"), build_model("llama")
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    options = dict(chunk_size=8, recent_window=0, sink_tokens=0)
    with KVTierCache.for_model(model, store_path=tmp_path / "s", **options) as cache, torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_kw(model): cache})
        cache.save()
    cache = KVTierCache.open(tmp_path / "s", model)
    assert cache.stats().device.tokens == 0
    op(cache)
    assert cache.get_seq_length() == kept and not cache.interrupted
    held = ids[:, :kept]  # (the span removed is the last four tokens)
    token = torch.tensor([[9]])
    with torch.no_grad():
        got = model(input_ids=token, position_ids=torch.tensor([[kept]]), use_cache=True,
                    **{cache_kw(model): cache}).logits[0, -1]
        want = ref_model(input_ids=torch.cat([held, token], 1)).logits[0, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    cache.close()


def test_sparse_reopen_of_a_session_with_chunks_past_the_planning_bounds(tmp_path):
    """An exact-mode session saved with chunk_size=512 (above sparse mode's default max_chunk_size, 256) reopens
    in sparse mode: the bounds widen to the session's chunking; bounds the caller sets that exclude it are named."""
    model = build_model("llama")
    m = twin(model)
    doc = torch.randint(3, 128, (1, 600), generator=torch.Generator().manual_seed(3))
    cache = KVTierCache.for_model(m, store_path=tmp_path / "s", chunk_size=512)
    m(input_ids=doc, **{cache_kw(m): cache})
    cache.save()
    cache.close()
    reopened = KVTierCache.open(tmp_path / "s", m, mode="sparse", sparse_budget=1.0)
    assert reopened.config.chunk_size == 512 and reopened.config.max_chunk_size == 512
    ids = torch.cat([doc, torch.tensor([[5, 6, 7]])], dim=1)
    out = m.generate(input_ids=ids, max_new_tokens=4, do_sample=False, **{cache_kw(m): reopened})
    assert out[0, ids.shape[1]:].tolist() == one_shot(model, ids, 4)
    reopened.close()
    with pytest.raises(ValueError, match=r"`max_chunk_size`=256: this session was saved with chunk_size=512"):
        KVTierCache.open(tmp_path / "s", m, mode="sparse", max_chunk_size=256)


def test_sparse_reopen_reserves_no_more_than_the_session_holds(saved):
    """A sparse budget larger than the session (or a huge saved recent window) never sizes the device arena past
    the session's own length at open."""
    model, _, store, _ = saved
    cache = KVTierCache.open(store, twin(model), mode="sparse", sparse_budget=100_000)
    assert all(pool.capacity <= 300 for pool in cache.tiers.device_pools.values())
    cache.close()
