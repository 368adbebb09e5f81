"""Random damage to a saved store is detected (a KVTierError) or harmless (the intact store's logits), never
silent, never another exception. A few dozen damages here; `--fuzz-examples N` (or tests/store_fuzz.py,
which also counts crashes) for a longer run."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_fuzz import KINDS, Harness


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return Harness(tmp_path_factory.mktemp("fuzz"))


def test_random_damage_is_detected_or_harmless(harness, tmp_path_factory, request):
    examples = request.config.getoption("--fuzz-examples")
    work = tmp_path_factory.mktemp("damaged")

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1))
    def check(kind, seed):
        result, detail = harness.outcome(harness.damaged_copy(kind, seed, work))
        assert result in ("detected", "harmless"), f"{kind} seed {seed}: {result}: {detail}"

    check()
