"""Training throughput: ``cfseg fit`` against a plain MONAI + PyTorch loop on the same network, patch and batch.

The two sides run as **interleaved pairs in one process**, so each pair shares the machine's conditions, the
thread count, the precision and the allocator (the same glibc ``malloc`` state and ``MALLOC_*`` settings):

* **cfseg**: the real ``cfseg fit`` pipeline from the YAML configs (data module with cached volumes and random
  class-balanced crops, prototype head, partial-label loss, Lightning loop and logging), with validation and
  checkpointing off. A cfseg step is the interval between consecutive ``on_train_batch_start`` calls (so it
  includes loading the next batch), less the plain step run inside that interval.
* **plain**: the config's MONAI backbone + a ``1x1x1`` softmax conv, ``monai.losses.DiceCELoss``, AdamW, on a
  fixed in-memory batch (``batch_size x samples_per_volume`` patches): the network's own step cost, nothing
  else. One plain step runs inside every cfseg step's interval, from a Lightning callback: right after the
  cfseg step (``on_train_batch_end``) in even pairs, right before it (``on_train_batch_start``, after the batch
  was loaded) in odd pairs, so neither side always runs first.

Each side's wall time (``time.perf_counter``) and main-thread CPU time (``time.thread_time``: user + system,
page faults included, descheduled time excluded; the training loop, data loading with ``num_workers: 0`` and
the plain step all run on the main thread) is kept per pair, with the 1-minute load average and the number of
runnable tasks (``/proc/loadavg``) at the pair's start; the load averages are also recorded before and after
the run.

**Discard rule.** A pair is discarded when the machine was busy for it: either side's CPU / wall below
``--min-cpu-fraction`` (default 0.9) times the core share the process is expected to get, or, with
``--max-load``, the 1-minute load average at the pair's start above that value. The expected share is 1 by
default (the process should have its core: a pair where it lost more than a tenth of it is dropped). On a
machine that is never idle (more runnable tasks than cores for the whole run, so no pair has its core)
``--expected-share median`` takes the run's median CPU / wall over both sides of every pair instead: a pair is
then dropped when either side got less than 0.9 of the share the process had the run over, i.e. when the load
changed during it, so the two sides ran under different conditions; the CPU-time ratio is the number to read
then, since descheduled time is not in it. Every run also reports how many pairs had their full core
(``kept_at_full_core``). The first ``--warmup`` pairs are never used.

Reported over the kept pairs: the median of the per-pair ratio cfseg / plain (wall and CPU), its spread (min,
quartiles, max) and each side's median step time; the run says how many pairs it discarded and why, and fails
(exit 1) when fewer than ``--min-pairs`` are kept. ``--precision bf16-mixed`` runs both sides under bfloat16
autocast (a separate ``fit``).

Example (OpenKBP joint config, one thread; the report's row; add ``--expected-share median`` where no core is
ever free)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_throughput.py --threads 1 --warmup 5 --pairs 40 \\
        --max-cases 24 --precision 32-true --out reports/data/speed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml


def _merged_config(paths: list[str]) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    for p in paths:
        for k, v in (yaml.safe_load(Path(p).read_text()) or {}).items():
            cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


# ------------------------------------------------------------------------------------------ pair bookkeeping
def machine_load() -> tuple[float, int | None]:
    """``(1-minute load average, runnable tasks now)``; the second is None where ``/proc/loadavg`` is missing."""
    try:
        fields = Path("/proc/loadavg").read_text().split()
        return float(fields[0]), int(fields[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return os.getloadavg()[0], None


Mark = tuple[float, float, float, int | None]  # (wall, thread CPU, load1, runnable) at a step's start
Plain = tuple[float, float, str]  # (wall s, CPU s, "before" | "after") of one plain step


def pairs_from_marks(marks: list[Mark], plain: dict[int, Plain], warmup: int, n_pairs: int) -> list[dict[str, Any]]:
    """Pairs ``warmup .. warmup + n_pairs - 1`` from the step markers and the plain steps.

    Args:
        marks: per cfseg step, ``(wall, thread CPU, load1, runnable)`` at its ``on_train_batch_start``.
        plain: per step index, ``(wall s, CPU s, "before" | "after")`` of the plain step run inside that step's
            interval (``marks[i]`` to ``marks[i + 1]``).
        warmup: pairs left out at the start.
        n_pairs: pairs returned (each needs the next step's marker).

    Returns:
        One dict per pair: ``index``, ``order`` (where the plain step ran), ``cfseg_wall``, ``cfseg_cpu`` (the
        interval less the plain step), ``plain_wall``, ``plain_cpu``, ``load1`` and ``runnable``.
    """
    if len(marks) < warmup + n_pairs + 1:
        raise ValueError(f"{len(marks)} step markers, need {warmup + n_pairs + 1} for {n_pairs} pairs after "
                         f"{warmup} warm-up pairs")
    out = []
    for i in range(warmup, warmup + n_pairs):
        (w0, c0, load1, runnable), (w1, c1, *_) = marks[i], marks[i + 1]
        pw, pc, order = plain[i]
        out.append({"index": i, "order": order, "cfseg_wall": w1 - w0 - pw, "cfseg_cpu": c1 - c0 - pc,
                    "plain_wall": pw, "plain_cpu": pc, "load1": load1, "runnable": runnable})
    return out


def busy_reason(pair: dict[str, Any], min_cpu_fraction: float, max_load: float | None) -> str | None:
    """Why ``pair`` counts as measured on a busy machine (None: keep it): either side's CPU / wall below
    ``min_cpu_fraction``, or its 1-minute load average above ``max_load`` (when given)."""
    for side in ("cfseg", "plain"):
        if pair[f"{side}_cpu"] < min_cpu_fraction * pair[f"{side}_wall"]:
            return f"{side} CPU/wall < {min_cpu_fraction:.3g}"
    if max_load is not None and pair["load1"] > max_load:
        return f"load1 > {max_load}"
    return None


def spread(xs: list[float]) -> dict[str, float]:
    """``min``, ``q1``, ``median``, ``q3``, ``max`` (inclusive quartiles)."""
    if not xs:
        raise ValueError("no values")
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return {"min": min(xs), "q1": q1, "median": med, "q3": q3, "max": max(xs)}


def cpu_share(pairs: list[dict[str, Any]]) -> float:
    """The median CPU / wall over both sides of every pair: the share of a core the process had the run over."""
    return statistics.median(p[f"{s}_cpu"] / p[f"{s}_wall"] for p in pairs for s in ("cfseg", "plain"))


def summarise(pairs: list[dict[str, Any]], min_cpu_fraction: float = 0.9, max_load: float | None = None,
              expected_share: float | str = 1.0) -> dict[str, Any]:
    """Mark each pair ``kept`` (or give its ``discarded`` reason) and summarise the kept ones.

    A pair is discarded when either side's CPU / wall is below ``min_cpu_fraction * expected_share``
    (``expected_share="median"``: :func:`cpu_share` of these pairs) or its load average is above ``max_load``.

    Returns:
        ``kept`` and ``discarded`` (counts), ``discard_reasons`` ({reason: count}), ``kept_at_full_core`` (pairs
        with both sides at CPU / wall >= ``min_cpu_fraction``), the share used and the median share, the
        per-pair ratios cfseg / plain as :func:`spread` (``ratio_wall``, ``ratio_cpu``), each side's median
        wall and CPU step time over the kept pairs, and the spread of ``load1`` and of the runnable tasks over
        all pairs (``load1_during``, ``runnable_during``). Ratios and medians are None when no pair is kept.
    """
    median_share = cpu_share(pairs) if pairs else None
    if expected_share == "median":
        if median_share is None:
            raise ValueError("expected_share='median' needs pairs")
        share = median_share
    elif isinstance(expected_share, (int, float)) and 0 < expected_share <= 1:
        share = float(expected_share)
    else:
        raise ValueError(f"expected_share must be in (0, 1] or 'median', got {expected_share!r}")
    reasons: Counter[str] = Counter()
    kept = []
    for p in pairs:
        why = busy_reason(p, min_cpu_fraction * share, max_load)
        p["kept"] = why is None
        p["discarded"] = why
        if why is None:
            kept.append(p)
        else:
            reasons[why] += 1
    full = sum(busy_reason(p, min_cpu_fraction, None) is None for p in pairs)
    out: dict[str, Any] = {"kept": len(kept), "discarded": len(pairs) - len(kept),
                           "discard_reasons": dict(sorted(reasons.items())), "kept_at_full_core": full,
                           "min_cpu_fraction": min_cpu_fraction, "max_load": max_load,
                           "expected_share": expected_share, "share_used": share, "median_share": median_share,
                           "load1_during": spread([p["load1"] for p in pairs]) if pairs else None}
    runnable = [p["runnable"] for p in pairs if p.get("runnable") is not None]
    out["runnable_during"] = spread([float(r) for r in runnable]) if runnable else None
    for name, (num, den) in {"ratio_wall": ("cfseg_wall", "plain_wall"),
                             "ratio_cpu": ("cfseg_cpu", "plain_cpu")}.items():
        out[name] = spread([p[num] / p[den] for p in kept]) if kept else None
    for side in ("cfseg", "plain"):
        out[f"{side}_step_s"] = statistics.median(p[f"{side}_wall"] for p in kept) if kept else None
        out[f"{side}_step_cpu_s"] = statistics.median(p[f"{side}_cpu"] for p in kept) if kept else None
    return out


# ----------------------------------------------------------------------------------------------- the two sides
class PlainStep:
    """One step of backbone + softmax conv + DiceCE + AdamW on a fixed batch; calling it returns (wall, CPU)."""

    def __init__(self, cfg: dict[str, Any], num_classes: int, precision: str) -> None:
        import torch
        from monai.losses import DiceCELoss

        from cfseg.builder import build_network

        self.torch = torch
        g = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():  # leave the global RNG (cfseg's seeded run) as it was
            torch.manual_seed(0)
            self.model = torch.nn.Sequential(build_network(cfg["model"]["backbone"]),
                                             torch.nn.Conv3d(cfg["model"]["feature_channels"], num_classes, 1))
        data = cfg["data"]
        n = data["batch_size"] * data["samples_per_volume"]
        self.x = torch.rand(n, 1, *data["patch_size"], generator=g)
        self.y = torch.randint(0, num_classes, (n, 1, *data["patch_size"]), generator=g)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.bf16 = precision == "bf16-mixed"

    def __call__(self) -> tuple[float, float]:
        torch = self.torch
        t, c = time.perf_counter(), time.thread_time()
        with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn(self.model(self.x).float(), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t, time.thread_time() - c


def paired_fit(configs: list[str], cfg: dict[str, Any], n_steps: int, precision: str, max_cases: int | None,
               workdir: Path) -> tuple[list[Mark], dict[int, Plain]]:
    """Run ``cfseg fit`` for ``n_steps + 1`` steps with one plain step inside each of the first ``n_steps``.

    Returns the step markers and the plain steps as :func:`pairs_from_marks` reads them.
    """
    from lightning.pytorch.callbacks import Callback

    from cfseg.apps.cli import CFSegCLI
    from cfseg.data.datamodule import SegDataModule
    from cfseg.module import CFSegModule

    class PairedSteps(Callback):
        def __init__(self, plain: PlainStep) -> None:
            self.plain_step = plain
            self.marks: list[Mark] = []
            self.plain: dict[int, Plain] = {}

        def _plain(self, order: str) -> None:
            i = len(self.marks) - 1
            if i < n_steps and (i % 2 == 1) == (order == "before"):
                self.plain[i] = (*self.plain_step(), order)

        def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
            load1, runnable = machine_load()
            self.marks.append((time.perf_counter(), time.thread_time(), load1, runnable))
            self._plain("before")

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            self._plain("after")

    args = [a for c in configs for a in ("--config", c)]
    args += [f"--trainer.max_steps={n_steps + 1}", f"--trainer.precision={precision}",
             "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
             "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={workdir}",
             f"--trainer.logger.init_args.save_dir={workdir}", "--trainer.callbacks=[]"]
    if max_cases:
        path = cfg["data"]["datasets"][0]["path"]
        subset = [{"path": path, "split_file": None, "val_fraction": 0.0, "test_fraction": 0.0, "max_cases": max_cases}]
        args.append(f"--data.datasets={json.dumps(subset)}")
    cli = CFSegCLI(CFSegModule, SegDataModule, args=args, run=False)
    paired = PairedSteps(PlainStep(cfg, len(cli.model.bank.names), precision))
    cli.trainer.callbacks.append(paired)
    cli.trainer.fit(cli.model, cli.datamodule)
    return paired.marks, paired.plain


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=["configs/openkbp/base.yaml", "configs/openkbp/joint.yaml"])
    p.add_argument("--pairs", type=int, default=30, help="measured pairs (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="pairs run first and left out")
    p.add_argument("--min-pairs", type=int, default=10, help="fail when fewer pairs are kept")
    p.add_argument("--min-cpu-fraction", type=float, default=0.9,
                   help="discard a pair where either side's CPU / wall time is below this x the expected share")
    p.add_argument("--max-load", type=float, default=None,
                   help="also discard a pair whose 1-minute load average is above this (default: not used)")
    p.add_argument("--expected-share", default="1",
                   help="core share the process should get: a number in (0, 1] or 'median' (see above)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", nargs="+", default=["32-true"], help="32-true and/or bf16-mixed")
    p.add_argument("--max-cases", type=int, default=24, help="cases cached for the cfseg run (0 = all)")
    p.add_argument("--out", type=Path, default=Path("benchmarks"))
    a = p.parse_args(argv)
    share = a.expected_share if a.expected_share == "median" else float(a.expected_share)
    load_before = list(os.getloadavg())
    import torch

    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = _merged_config(a.config)
    rows, ok = [], True
    for precision in a.precision:
        with tempfile.TemporaryDirectory() as logs:
            marks, plain = paired_fit(a.config, cfg, a.warmup + a.pairs, precision, a.max_cases or None, Path(logs))
        pairs = pairs_from_marks(marks, plain, a.warmup, a.pairs)
        row = {"precision": precision, "threads": a.threads, "warmup": a.warmup, "pairs_run": a.pairs,
               **summarise(pairs, a.min_cpu_fraction, a.max_load, share), "pairs": pairs}
        rows.append(row)
        ok &= row["kept"] >= a.min_pairs
        if row["kept"]:
            rw, rc = row["ratio_wall"], row["ratio_cpu"]
            print(f"{precision:>10}: {row['kept']} pairs kept, {row['discarded']} discarded "
                  f"{row['discard_reasons']} ({row['kept_at_full_core']} had the full core, median share "
                  f"{row['median_share']:.2f}); cfseg / plain median wall {rw['median']:.3f} "
                  f"(min {rw['min']:.3f}, q1 {rw['q1']:.3f}, q3 {rw['q3']:.3f}, max {rw['max']:.3f}), CPU "
                  f"{rc['median']:.3f} (min {rc['min']:.3f}, q1 {rc['q1']:.3f}, q3 {rc['q3']:.3f}, max "
                  f"{rc['max']:.3f}); medians cfseg {row['cfseg_step_s']:.3f} s ({row['cfseg_step_cpu_s']:.3f} "
                  f"CPU), plain {row['plain_step_s']:.3f} s ({row['plain_step_cpu_s']:.3f} CPU); load1 during "
                  f"{row['load1_during']['min']:.2f}-{row['load1_during']['max']:.2f}", flush=True)
        else:
            print(f"{precision:>10}: every pair discarded {row['discard_reasons']} (median share "
                  f"{row['median_share']:.2f})", flush=True)
    doc = {"config": a.config, "patch": cfg["data"]["patch_size"],
           "patches_per_step": cfg["data"]["batch_size"] * cfg["data"]["samples_per_volume"],
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "malloc_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))},
           "argv": sys.argv[1:] if argv is None else argv,
           "load_before": load_before, "load_after": list(os.getloadavg()), "rows": rows}
    (a.out / "train_throughput.json").write_text(json.dumps(doc, indent=2) + "\n")
    if not ok:
        print(f"fewer than {a.min_pairs} pairs kept: the machine was too busy for a trustworthy ratio", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
