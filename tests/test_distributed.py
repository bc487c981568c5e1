"""cfseg.distributed in 2 processes (gloo on the CPU) and in one: sums, gathered rows, the consistency check."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cfseg import distributed as D


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out = {"world": D.world_size(), "rank": D.rank(), "per_rank": [D.per_rank(n) for n in (0, 1, 4, 5)]}
        out["sum"] = D.global_sum(torch.tensor([1.0, 2.0]) * (rank + 1)).tolist()
        sums = D.global_sums({"a": torch.full((2, 2), float(rank)), "b": torch.tensor([rank], dtype=torch.int64)})
        out["sums"] = {k: v.tolist() for k, v in sums.items()}
        out["rows"] = D.gather_rows(torch.full((rank + 1, 3), float(rank))).tolist()  # 1 row, then 2 rows
        out["objects"] = D.gather_objects({"rank": rank})
        seen = []
        out["mapped"] = D.shared_map(lambda i: (seen.append(i), i * 10)[1], list(range(5)))
        out["computed"] = seen
        D.check_identical({"same": torch.ones(3), "nested": {"n": 4, "t": [torch.zeros(2)]}}, "test")
        for bad in ({"x": torch.full((3,), float(rank))}, {"only_on_1": torch.ones(1)} if rank else {}):
            try:
                D.check_identical(bad, "test")
                out.setdefault("raised", []).append(None)
            except RuntimeError as e:
                out.setdefault("raised", []).append(str(e))
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_helpers_across_two_processes():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    assert (r0["world"], r0["rank"], r1["rank"]) == (2, 0, 1)
    assert r0["per_rank"] == [0, 1, 2, 3]  # all ranks together take at least n batches
    assert r0["sum"] == r1["sum"] == [3.0, 6.0]
    assert r0["sums"] == r1["sums"] == {"a": [[1.0, 1.0], [1.0, 1.0]], "b": [1]}
    assert r0["rows"] == r1["rows"] == [[0.0] * 3, [1.0] * 3, [1.0] * 3]  # rank order, unequal row counts
    assert r0["objects"] == [{"rank": 0}, {"rank": 1}]
    assert r0["mapped"] == r1["mapped"] == [0, 10, 20, 30, 40]  # every result everywhere, in order
    assert (r0["computed"], r1["computed"]) == ([0, 2, 4], [1, 3])  # each item computed once
    for r in (r0, r1):  # a per-rank value and a statistic one rank lacks are both refused, on every rank
        assert all(msg is not None and "differ between the 2 processes" in msg for msg in r["raised"]), r["raised"]
    assert "x: sums per rank [0.0, 3.0]" in r0["raised"][0]


def test_helpers_are_the_identity_in_one_process():
    t = torch.arange(6.0).reshape(3, 2)
    assert D.world_size() == 1 and D.rank() == 0 and D.per_rank(5) == 5
    assert D.global_sum(t) is t and torch.equal(D.gather_rows(t), t)
    assert D.gather_objects("x") == ["x"]
    assert D.shared_map(lambda i: i + 1, [1, 2]) == [2, 3]
    D.check_identical({"anything": torch.randn(3)}, "one process")  # nothing to compare with


def test_numeric_leaves_flattens_nested_statistics():
    leaves = D.numeric_leaves({"router": {"G": torch.eye(2), "n_samples": [4, 2]}, "name": "x", "flag": True,
                               "none": None})
    assert sorted(leaves) == ["router.G", "router.n_samples.0", "router.n_samples.1"]
    assert float(leaves["router.n_samples.0"]) == 4.0

