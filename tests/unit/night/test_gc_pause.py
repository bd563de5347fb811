"""The batch's pause of the cyclic garbage collector (`pipeline._gc_paused`): off for the batch, on again after,
nothing left frozen, and a cycle the batch made still collected afterwards."""

from __future__ import annotations

import gc
import weakref

from overnight.night import pipeline


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_the_collector_is_off_for_the_batch_and_on_after_with_nothing_frozen():
    assert gc.isenabled()
    with pipeline._gc_paused():
        assert not gc.isenabled()
        a, b = _Node(), _Node()
        a.other, b.other = b, a  # a cycle: reference counting alone never frees it
        gone = weakref.ref(a)
        del a, b
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert gone() is not None  # not scanned on the way out
    gc.collect()
    assert gone() is None


def test_a_collector_switched_off_by_the_caller_stays_off():
    gc.disable()
    try:
        with pipeline._gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
