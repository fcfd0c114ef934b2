"""The latency benches' timer (bench.p6_latency.time_blocks): each file's calls run as
one block per pass, passes rotate the order, and every file gets the asked-for calls.

Blocks are what keep one runtime's spin-waiting worker threads from slowing the next
file at 2 threads (see its docstring); one call per file per round would pass the
call-count checks but fail the block check.
"""

from __future__ import annotations

import itertools

import numpy as np

from bench import p6_latency


def _recording_runners(names: list[str], log: list[str]) -> dict:
    def runner(name: str):
        return lambda x: log.append(name)

    return {name: runner(name) for name in names}


def test_each_file_is_timed_in_one_block_per_pass_with_rotated_order(monkeypatch) -> None:
    monkeypatch.setattr(p6_latency, "PAUSE_S", 0.0)
    log: list[str] = []
    names = ["ort", "ncnn", "litert"]
    warmup, rounds = 2, 7
    result = p6_latency.time_blocks(_recording_runners(names, log), np.zeros(1), warmup, rounds)

    assert len(log) == p6_latency.PASSES * len(names) * warmup + len(names) * rounds
    runs = [(name, len(list(group))) for name, group in itertools.groupby(log)]
    assert len(runs) == p6_latency.PASSES * len(names)   # consecutive calls, one block each
    for p in range(p6_latency.PASSES):
        block = runs[p * len(names):(p + 1) * len(names)]
        assert block[0][0] == names[p]                  # each pass starts one file later
        assert len({size for _, size in block}) == 1    # every file the same calls per pass
    for name in names:
        assert result[name]["runs"] == rounds           # exactly the asked-for timed calls
        assert sum(size for n, size in runs if n == name) == \
            p6_latency.PASSES * warmup + rounds
        assert result[name]["median_ms"] >= 0 and result[name]["cpu_median_ms"] >= 0
