"""gateway.gcpolicy: when long-lived objects are frozen, and that every collection's pause is counted."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.gcpolicy import GcPolicy


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process's objects go back to the collector


def test_freezes_at_start_and_after_the_held_connections_grew_by_the_setting() -> None:
    held = [0]
    policy = GcPolicy(100, lambda: held[0])
    policy.start()
    try:
        assert policy.freezes == 1
        held[0] = 99
        policy.check()
        assert policy.freezes == 1
        held[0] = 100
        policy.check()
        assert policy.freezes == 2 and policy.frozen > 0
        held[0] = 40  # sessions went: growth counts from the new level
        policy.check()
        held[0] = 139
        policy.check()
        assert policy.freezes == 2
        held[0] = 140
        policy.check()
        assert policy.freezes == 3
    finally:
        policy.stop()


def test_zero_never_freezes_and_collections_are_timed_either_way() -> None:
    policy = GcPolicy(0, lambda: 10**6)
    policy.start()
    try:
        policy.check()
        assert policy.freezes == 0 and policy.frozen == 0
        before = sum(policy.pause_counts)
        gc.collect()
        assert sum(policy.pause_counts) == before + 1 and policy.full_collections >= 1 and policy.pause_sum > 0
    finally:
        policy.stop()
    gc.collect()
    assert sum(policy.pause_counts) == before + 1  # stopped: no longer counted
