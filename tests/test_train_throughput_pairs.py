"""benchmarks/train_throughput.py: the interleaved-pair protocol's bookkeeping on synthetic timings (no timing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


@pytest.fixture(scope="module")
def tt():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pair(cw, cc, pw, pc, load1=1.0, runnable=1):
    return {"cfseg_wall": cw, "cfseg_cpu": cc, "plain_wall": pw, "plain_cpu": pc, "load1": load1,
            "runnable": runnable}


def test_pairs_subtract_the_plain_step_from_the_cfseg_interval(tt):
    # markers every 3 s of wall and 2.5 s of CPU; the plain step inside each interval took 1 s wall, 0.9 s CPU
    marks = [(3.0 * i, 2.5 * i, 0.5 + i, i) for i in range(6)]
    plain = {i: (1.0, 0.9, "after" if i % 2 == 0 else "before") for i in range(5)}
    pairs = tt.pairs_from_marks(marks, plain, warmup=2, n_pairs=3)
    assert [p["index"] for p in pairs] == [2, 3, 4]
    assert [p["order"] for p in pairs] == ["after", "before", "after"]
    for p in pairs:
        assert p["cfseg_wall"] == pytest.approx(2.0) and p["cfseg_cpu"] == pytest.approx(1.6)
        assert (p["plain_wall"], p["plain_cpu"]) == (1.0, 0.9)
    assert [p["load1"] for p in pairs] == [2.5, 3.5, 4.5]  # the load at the pair's own start
    with pytest.raises(ValueError, match="need 6"):
        tt.pairs_from_marks(marks[:5], plain, warmup=2, n_pairs=3)


def test_discard_rule(tt):
    assert tt.busy_reason(_pair(1.0, 0.95, 1.0, 0.99), 0.9, None) is None
    assert tt.busy_reason(_pair(1.0, 0.85, 1.0, 0.99), 0.9, None) == "cfseg CPU/wall < 0.9"
    assert tt.busy_reason(_pair(1.0, 0.95, 2.0, 1.0), 0.9, None) == "plain CPU/wall < 0.9"
    assert tt.busy_reason(_pair(1.0, 0.95, 1.0, 1.0, load1=2.5), 0.9, None) is None
    assert tt.busy_reason(_pair(1.0, 0.95, 1.0, 1.0, load1=2.5), 0.9, 2.0) == "load1 > 2.0"


def test_summary_over_kept_pairs(tt):
    ratios = [1.0, 1.1, 1.2, 1.3, 1.4]
    pairs = [_pair(r, r, 1.0, 1.0, load1=1.0 + i) for i, r in enumerate(ratios)]
    pairs.append(_pair(5.0, 1.0, 1.0, 1.0, load1=9.0))  # cfseg descheduled: dropped, its ratio 5 never counts
    s = tt.summarise(pairs, 0.9)
    assert (s["kept"], s["discarded"]) == (5, 1)
    assert s["discard_reasons"] == {"cfseg CPU/wall < 0.9": 1}
    assert [p["kept"] for p in pairs] == [True] * 5 + [False]
    assert pairs[-1]["discarded"] == "cfseg CPU/wall < 0.9"
    for key in ("ratio_wall", "ratio_cpu"):
        assert s[key] == pytest.approx({"min": 1.0, "q1": 1.1, "median": 1.2, "q3": 1.3, "max": 1.4})
    assert s["cfseg_step_s"] == pytest.approx(1.2) and s["plain_step_s"] == 1.0
    assert s["load1_during"]["min"] == 1.0 and s["load1_during"]["max"] == 9.0  # over every pair, kept or not
    none = tt.summarise([_pair(5.0, 1.0, 1.0, 1.0)], 0.9)
    assert none["kept"] == 0 and none["ratio_wall"] is None and none["cfseg_step_s"] is None


def test_spread_of_one_value(tt):
    assert tt.spread([2.0]) == {"min": 2.0, "q1": 2.0, "median": 2.0, "q3": 2.0, "max": 2.0}
    with pytest.raises(ValueError):
        tt.spread([])


def test_expected_share_median_keeps_pairs_at_the_runs_steady_share(tt):
    # the process had half a core throughout, except pair 3 where cfseg's share fell to 0.4 (the load changed)
    pairs = [_pair(2.0, 1.0, 2.0, 1.0) for _ in range(5)]
    pairs[3] = _pair(2.5, 1.0, 2.0, 1.0)
    strict = tt.summarise([dict(p) for p in pairs], 0.9)
    assert strict["kept"] == 0 and strict["kept_at_full_core"] == 0 and strict["ratio_wall"] is None
    s = tt.summarise(pairs, 0.9, expected_share="median")
    assert s["median_share"] == pytest.approx(0.5) and s["share_used"] == pytest.approx(0.5)
    assert (s["kept"], s["discarded"], s["kept_at_full_core"]) == (4, 1, 0)
    assert not pairs[3]["kept"] and pairs[3]["discarded"] == "cfseg CPU/wall < 0.45"
    assert s["ratio_wall"]["max"] == 1.0  # the distorted pair (wall ratio 1.25, CPU ratio 1.0) is not counted
    with pytest.raises(ValueError, match="expected_share"):
        tt.summarise(pairs, 0.9, expected_share=0.0)
