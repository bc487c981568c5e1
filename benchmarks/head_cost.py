"""Training-step cost of the classifier-free head vs a softmax head on the same backbone.

Compares :class:`cfseg.nets.PrototypeSegmenter` (cosine logits against ``K+1`` fixed prototypes of width
``D``) with :class:`cfseg.nets.SoftmaxSegmenter` (a ``1x1x1`` conv ``F -> K+1``), both on
:func:`cfseg.nets.default_backbone` with identical weights, for several class counts.

* Time: one training step = forward + cross-entropy + backward + AdamW step. Both models live in one fresh
  process per class count and their steps are interleaved (ABBA order) so that load from other jobs hits both
  alike; we report the median over ``--reps`` steps after ``--warmup`` steps and three ratios: of the
  medians, the median of the per-pair ratios, and of the minima (the least disturbed step of each; on a
  shared machine, load only ever adds time).
* Peak memory: each (model, class count) runs in its own fresh subprocess, ``--mem-repeats`` times (median).
  On CPU it is the growth of peak RSS (``resource.getrusage(...).ru_maxrss``) over its value after the model,
  optimiser and inputs were built; on CUDA it is ``torch.cuda.max_memory_allocated`` minus the allocation
  after construction.

``--classes`` counts output channels (``K+1``, background included). Prototypes are random orthonormal rows.
``--head-only`` replaces the backbone by the identity on random ``F``-channel features (the input gradient is
still computed), isolating the heads; ``--head-impl autograd`` runs the same factorised maths through plain
autograd instead of the hand-written backward, for comparison.

Example::

    python benchmarks/head_cost.py --patch 64 --classes 8 32 117 --reps 7 --out /tmp/head_cost
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

KINDS = ("cfseg", "softmax")


# ----------------------------------------------------------------------------------------------------------
# Worker side (runs in a fresh interpreter)
# ----------------------------------------------------------------------------------------------------------
def _build(kind: str, num_classes: int, cfg: dict[str, Any]):
    import torch

    import cfseg.cosine as cosine
    from cfseg.nets import PrototypeSegmenter, SoftmaxSegmenter, default_backbone

    if cfg["head_impl"] == "autograd":  # the same factorised maths through plain autograd, for comparison
        cosine._cosine_head = cosine.cosine_head_autograd

    torch.manual_seed(cfg["seed"])  # the same backbone weights for both kinds
    if cfg["head_only"]:  # the head alone on random features (input gradient still computed)
        backbone = torch.nn.Identity()
    else:
        backbone = default_backbone(feature_channels=cfg["feature_channels"])
    if kind == "cfseg":
        model = PrototypeSegmenter(backbone, cfg["feature_channels"], cfg["embed_dim"], temperature=0.07)
    elif kind == "softmax":
        model = SoftmaxSegmenter(backbone, cfg["feature_channels"], num_classes)
    else:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}.")
    model = model.to(cfg["device"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt


def _inputs(num_classes: int, cfg: dict[str, Any]):
    import torch

    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    side, batch, d = cfg["patch"], cfg["batch"], cfg["embed_dim"]
    x = torch.randn(batch, cfg["feature_channels"] if cfg["head_only"] else 1, side, side, side, generator=g)
    y = torch.randint(0, num_classes, (batch, side, side, side), generator=g)
    if num_classes > d:
        raise ValueError(f"cannot build {num_classes} orthonormal prototypes of width {d}; lower --classes.")
    q, _ = torch.linalg.qr(torch.randn(d, num_classes, generator=g))
    protos = q.T.contiguous()  # [K+1, D], orthonormal rows
    dev = cfg["device"]
    return x.to(dev).requires_grad_(cfg["head_only"]), y.to(dev), protos.to(dev)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step(model, opt, x, y, protos) -> None:
    import torch

    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x, protos), y)
    loss.backward()
    opt.step()


def _worker_time(cfg: dict[str, Any]) -> dict[str, Any]:
    """Interleaved step timing of both kinds for one class count."""
    k = cfg["num_classes"]
    models = {kind: _build(kind, k, cfg) for kind in KINDS}
    x, y, protos = _inputs(k, cfg)
    for _ in range(cfg["warmup"]):
        for kind in KINDS:
            _step(*models[kind], x, y, protos)
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for rep in range(cfg["reps"]):
        order = KINDS if rep % 2 == 0 else KINDS[::-1]  # ABBA: cancels slow drift in machine load
        for kind in order:
            _sync(cfg["device"])
            t0 = time.perf_counter()
            _step(*models[kind], x, y, protos)
            _sync(cfg["device"])
            times[kind].append(time.perf_counter() - t0)
    return {"num_classes": k, "times_s": times}


def _worker_mem(cfg: dict[str, Any]) -> dict[str, Any]:
    """Peak memory growth of ``cfg['mem_steps']`` training steps of one kind, in MiB."""
    import torch

    k, kind, dev = cfg["num_classes"], cfg["kind"], cfg["device"]
    model, opt = _build(kind, k, cfg)
    x, y, protos = _inputs(k, cfg)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    for _ in range(cfg["mem_steps"]):
        _step(model, opt, x, y, protos)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "num_classes": k, "kind": kind,
        "peak_growth_mib": (peak - base) / 2**20, "baseline_mib": base / 2**20,
    }


def _worker_main(payload: str) -> None:
    cfg = json.loads(payload)
    import torch

    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    result = _worker_time(cfg) if cfg["mode"] == "time" else _worker_mem(cfg)
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------------
def _run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"benchmark worker failed (exit {proc.returncode}) for {cfg}:\n{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    mem_unit = "CUDA max_memory_allocated" if meta["device"].startswith("cuda") else "peak RSS growth"
    lines = [
        f"{'Heads alone' if meta['head_only'] else 'Backbone + head'}, "
        f"device `{meta['device']}` (torch threads: {meta['threads']}), patch {meta['patch']}^3, "
        f"batch {meta['batch']}, "
        f"F={meta['feature_channels']}, D={meta['embed_dim']}, cfseg head `{meta['head_impl']}`, "
        f"{meta['reps']} timed steps after "
        f"{meta['warmup']} warm-up, memory over {meta['mem_steps']} steps (median of {meta['mem_repeats']} "
        f"fresh processes); torch {meta['torch']}, "
        f"{meta['date']}.",
        "",
        "| classes (K+1) | step cfseg (s) | step softmax (s) | time ratio: medians | paired | minima "
        f"| {mem_unit} cfseg (MiB) | softmax (MiB) | memory ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['num_classes']} | {r['time_cfseg_s']:.3f} | {r['time_softmax_s']:.3f} "
            f"| {r['time_ratio']:.3f} | {r['time_ratio_paired']:.3f} | {r['time_ratio_min']:.3f} "
            f"| {r['mem_cfseg_mib']:.0f} | {r['mem_softmax_mib']:.0f} | {r['mem_ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", type=int, default=64, help="cubic patch side (divisible by 8)")
    parser.add_argument("--classes", type=int, nargs="+", default=[8, 32, 117], help="output channels K+1")
    parser.add_argument("--reps", type=int, default=5, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing")
    parser.add_argument("--mem-steps", type=int, default=2, help="training steps in each memory subprocess")
    parser.add_argument(
        "--mem-repeats", type=int, default=1, help="fresh memory subprocesses per configuration (median)"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--feature-channels", type=int, default=32)
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--head-only", action="store_true",
        help="time the heads alone on random F-channel features instead of backbone + head",
    )
    parser.add_argument(
        "--head-impl", choices=("fused", "autograd"), default="fused",
        help="cfseg head: the hand-written backward (default) or plain autograd on the same factorisation",
    )
    parser.add_argument("--out", type=Path, default=None, help="path stem: writes STEM.md and STEM.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        _worker_main(args.worker)
        return {}
    if args.patch % 8 != 0 or args.patch < 8:
        parser.error(f"--patch must be a positive multiple of 8 (three stride-2 levels), got {args.patch}.")
    if args.reps < 1 or args.warmup < 0 or args.mem_steps < 1 or args.mem_repeats < 1:
        parser.error("--reps, --mem-steps and --mem-repeats must be >= 1 and --warmup >= 0.")

    import torch

    base_cfg = {
        "patch": args.patch, "batch": args.batch, "feature_channels": args.feature_channels,
        "embed_dim": args.embed_dim, "device": args.device, "threads": args.threads, "seed": args.seed,
        "reps": args.reps, "warmup": args.warmup, "mem_steps": args.mem_steps, "head_impl": args.head_impl,
        "head_only": args.head_only,
    }
    rows, raw, threads = [], [], None
    for k in args.classes:
        t = _run_worker({**base_cfg, "mode": "time", "num_classes": k})
        mem = {kind: [] for kind in KINDS}
        for _ in range(args.mem_repeats):  # alternate kinds; each run a fresh process
            for kind in KINDS:
                mem[kind].append(_run_worker({**base_cfg, "mode": "mem", "num_classes": k, "kind": kind}))
        threads = t["threads"]
        tc, ts = t["times_s"]["cfseg"], t["times_s"]["softmax"]
        row = {
            "num_classes": k,
            "time_cfseg_s": statistics.median(tc),
            "time_softmax_s": statistics.median(ts),
            "time_ratio": statistics.median(tc) / statistics.median(ts),
            "time_ratio_paired": statistics.median(a / b for a, b in zip(tc, ts, strict=True)),
            "time_ratio_min": min(tc) / min(ts),
            "mem_cfseg_mib": statistics.median(m["peak_growth_mib"] for m in mem["cfseg"]),
            "mem_softmax_mib": statistics.median(m["peak_growth_mib"] for m in mem["softmax"]),
        }
        row["mem_ratio"] = row["mem_cfseg_mib"] / row["mem_softmax_mib"]
        rows.append(row)
        raw.append({"time": t, "memory": mem})
        print(
            f"K+1={k}: time {row['time_cfseg_s']:.3f}s vs {row['time_softmax_s']:.3f}s "
            f"(x{row['time_ratio']:.3f}, paired x{row['time_ratio_paired']:.3f}, minima "
            f"x{row['time_ratio_min']:.3f}); memory "
            f"{row['mem_cfseg_mib']:.0f} vs {row['mem_softmax_mib']:.0f} MiB (x{row['mem_ratio']:.3f})",
            flush=True,
        )
    meta = {
        **{
            key: base_cfg[key]
            for key in ("patch", "batch", "feature_channels", "embed_dim", "device", "head_impl", "head_only")
        },
        "reps": args.reps, "warmup": args.warmup, "mem_steps": args.mem_steps,
        "mem_repeats": args.mem_repeats, "threads": threads,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv),
    }
    table = _markdown(rows, meta)
    print(table)
    result = {"meta": meta, "rows": rows, "raw": raw}
    if args.out is not None:
        stem = args.out.with_suffix("") if args.out.suffix in (".md", ".json") else args.out
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_name(stem.name + ".md").write_text(table)
        stem.with_name(stem.name + ".json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
