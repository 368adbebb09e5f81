"""Sessions published on a Redis/Valkey server and reopened elsewhere: logits equal to the local session's."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model
from redis_server import with_name

from kvtier import KVTierCache

pytestmark = pytest.mark.redis
CHUNKING = dict(chunk_size=16, sink_tokens=4, recent_window=16, device_budget=40, host_budget=32)


def test_publish_and_reopen_gives_the_same_logits(redis_url, tmp_path):
    model = build_model("llama")
    doc = torch.randint(3, 128, (1, 230), generator=torch.Generator().manual_seed(5))
    nxt = torch.tensor([[7]])
    url = with_name(redis_url, "doc")
    with torch.no_grad():
        cache = KVTierCache.for_model(model, store_path=tmp_path / "local", **CHUNKING)
        model(doc, past_key_values=cache, use_cache=True)
        cache.save(remote=url)
        cache.close()
        local = KVTierCache.open(tmp_path / "local", model, **CHUNKING)
        want = model(nxt, past_key_values=local, use_cache=True).logits
        local.close()
        remote = KVTierCache.open(url, model, **CHUNKING)
        assert remote.remote is not None and "prefix" not in remote.remote
        got = model(nxt, past_key_values=remote, use_cache=True).logits
        remote.close()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
