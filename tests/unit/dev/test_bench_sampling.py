"""The benchmark's process sampler ends with the block it measures, however the block ends."""

from __future__ import annotations

import threading

import pytest

from overnight.dev import bench


def _samplers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sampler-") and t.is_alive()]


def test_the_sampler_ends_when_the_measured_block_is_stopped() -> None:
    b = bench.Bench.__new__(bench.Bench)  # only what the sampler reads: the components (none) and the figures
    b.procs, b.figures = {}, {}
    with pytest.raises(SystemExit), b.sampling("api_cpu_s_by_process"):
        assert len(_samplers()) == 1  # sampling while the block runs
        raise SystemExit(143)  # what the benchmark's SIGTERM handler raises, mid-measurement
    assert _samplers() == []
    assert isinstance(b.figures["api_cpu_s_by_process"], dict)  # its figure written before the exit went on

