"""Grouping a stream: order kept, groups bounded, never waiting for a group to fill,
producer errors surfacing after what came before them."""

from __future__ import annotations

import threading
import time

import pytest

from privface.batching import groups


def test_order_and_bounds():
    got = list(groups(iter(range(100)), 7))
    assert [x for g in got for x in g] == list(range(100))
    assert all(1 <= len(g) <= 7 for g in got)


def test_items_already_there_are_grouped():
    release = threading.Event()

    def slow():
        yield from range(10)
        release.wait(5)
        yield 10

    it = groups(slow(), 32)
    time.sleep(0.2)  # the reader has buffered 0..9 by now
    assert next(it) == list(range(10))  # one group, not ten
    release.set()
    assert next(it) == [10]
    assert list(it) == []


def test_does_not_wait_for_a_group_to_fill():
    gate = threading.Event()

    def trickle():
        yield "first"
        gate.wait(5)
        yield "second"

    it = groups(trickle(), 32)
    t0 = time.monotonic()
    assert next(it) == ["first"]
    assert time.monotonic() - t0 < 2
    gate.set()
    assert next(it) == ["second"]


def test_producer_error_after_its_items():
    def broken():
        yield 1
        yield 2
        raise RuntimeError("client went away")

    it = groups(broken(), 32)
    seen = []
    with pytest.raises(RuntimeError, match="went away"):
        for g in it:
            seen += g
    assert seen == [1, 2]


def test_consumer_stopping_early_releases_the_reader():
    it = groups(iter(range(10_000)), 4, prefetch=4)
    assert next(it)[0] == 0
    it.close()  # must not hang on a full buffer


def test_consumer_failing_does_not_wait_for_a_silent_client():
    never = threading.Event()

    def silent():
        yield 1
        never.wait(30)  # a client that neither sends nor closes
        yield 2

    it = groups(silent(), 4)
    assert next(it) == [1]
    t0 = time.monotonic()
    it.close()
    assert time.monotonic() - t0 < 1
    never.set()
