"""Whole-volume inference cost of LoRA experts as a function of the number of experts.

The network is the OpenKBP one (``configs/openkbp/base.yaml``): MONAI UNet 16-32-64-128-256, strides 2-2-2-2,
``num_res_units`` 0, 16 features, prototype head (``minilm`` prototypes), roi 64^3, ``sw_batch_size`` 2, overlap
0.25, random weights (timing does not depend on training). ``n`` experts are expert 0 (the shared network) plus
``n - 1`` LoRA experts (``--layout decoder``: rank 4, alpha 4 on
:data:`cfseg.continual.experts.DECODER_EXPERT_LAYERS`, the decoder's four up-sampling convolutions; ``--layout
every``: on every convolution, :data:`cfseg.continual.experts.EVERY_CONV_LAYERS`, the experts default with
``--rank 16``; alpha = rank) with random non-zero factors. The 8 classes are split into ``n`` contiguous groups, one
per expert (class-incremental: expert ``e`` serves the classes of stage ``e``, all in domain ``ct``).

What is timed: :meth:`cfseg.module.CFSegModule.sliding_window_logits` (Gaussian sliding windows, eval mode,
``torch.no_grad``) on one random volume ``[1, 1, 96, 96, 80]`` (an OpenKBP-size grid at 4 x 4 x 3 mm: 8 windows
of 64^3, 4 window batches), no pre-/post-processing. Cases:

* ``all``: every class requested, so every expert runs on every window; the encoder runs once per window batch
  for all of them (:func:`cfseg.continual.experts.shared_prefix_cache`) and the outputs merge as log-odds.
* ``all_nocache``: the same with ``shared_prefix_cache`` replaced by a no-op context manager (what the cache saves:
  the encoder then runs once per expert).
* ``one``: one class requested (the last one, served by the last LoRA expert): one expert runs, with its merged
  weights.
* ``plain``: the same network without LoRA layers (the baseline; the ``n = 1`` row).

Protocol (``--threads`` torch threads, default 1, in fresh interpreters):

* Time: one process per ``n`` loads the plain and the ``n``-expert checkpoints, runs each case once (warm-up), then
  ``--reps`` rounds that alternate the cases (plain, all, all_nocache, one), so load from other jobs hits them
  alike. Reported: median wall time, the median of the per-round ratios to ``plain`` (paired), median process CPU
  time, and how often the encoder's first convolution ran per volume (``encoder passes``; the volume has 4 window
  batches).
* Peak memory: one fresh process per (n, case) loads its checkpoint, builds the input, releases free heap memory
  to the OS (glibc ``malloc_trim(0)``) and resets the kernel's peak resident set size to the current one
  (``/proc/self/clear_refs`` <- 5), then runs one whole-volume inference. Reported: peak RSS during it (``VmHWM``)
  minus RSS just before it (``VmRSS``). This counts everything the inference touches (activations, merged expert
  weights, the stitched output ``[1, K'+1, 96, 96, 80]`` float32: 26 MiB for 8 classes), not the model or input.
  Where the peak cannot be reset, the growth of ``ru_maxrss`` is used instead (the JSON says which, per run).
* Checkpoints are written by the driver first (it alone loads the text encoder), so workers only load data.

Example (writes ``benchmarks/experts_cost.md`` and ``.json``)::

    OMP_NUM_THREADS=1 python benchmarks/experts_cost.py --experts 1 2 4 8 --reps 3 --out benchmarks/experts_cost
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: The 7 OpenKBP organs and one more head-and-neck organ, so that 8 experts serve one class each.
CLASSES = ["brainstem", "spinal_cord", "mandible", "parotid_gland_left", "parotid_gland_right", "esophagus",
           "larynx", "oral_cavity"]
BACKBONE: dict[str, Any] = {  # configs/openkbp/base.yaml
    "class_path": "monai.networks.nets.UNet",
    "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 16, "channels": [16, 32, 64, 128, 256],
                  "strides": [2, 2, 2, 2], "num_res_units": 0},
}
LAYOUTS = {"decoder": "DECODER_EXPERT_LAYERS", "every": "EVERY_CONV_LAYERS"}
LAYOUT_TEXT = {"decoder": "the decoder's four up-sampling convolutions", "every": "every convolution"}
CASES = ("plain", "all", "all_nocache", "one")


def split_classes(n: int) -> list[list[str]]:
    """``CLASSES`` in ``n`` contiguous, non-empty groups (expert e serves group e)."""
    if not 1 <= n <= len(CLASSES):
        raise ValueError(f"need 1 <= experts <= {len(CLASSES)} (one class per expert at least), got {n}")
    bounds = [round(i * len(CLASSES) / n) for i in range(n + 1)]
    return [CLASSES[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


# ----------------------------------------------------------------------------------------------------------
# Driver: checkpoints (the only process that loads the text encoder)
# ----------------------------------------------------------------------------------------------------------
def _save(module, path: Path) -> None:
    import torch

    ckpt: dict[str, Any] = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)


def prepare(folder: Path, ns: list[int], seed: int, layout_name: str = "decoder", rank: int = 4) -> dict[str, Any]:
    """Write ``plain.ckpt`` and ``experts_<n>.ckpt`` for every ``n >= 2``; returns parameter counts."""
    import copy

    import torch

    from cfseg.continual import experts
    from cfseg.module import CFSegModule

    torch.manual_seed(seed)
    module = CFSegModule(class_names=CLASSES, backbone=BACKBONE, feature_channels=16, head="prototype",
                         encoder="minilm", roi_size=(64, 64, 64), sw_batch_size=2, sw_overlap=0.25)
    _save(module, folder / "plain.ckpt")
    network = sum(p.numel() for p in module.net.parameters())
    layout = {"layers": list(getattr(experts, LAYOUTS[layout_name])), "rank": rank, "alpha": float(rank)}
    for n in ns:
        if n < 2:
            continue
        m = copy.deepcopy(module)
        experts.attach_lora(m.net, layout["layers"], rank, float(rank))
        for _ in range(n - 1):
            experts.add_expert(m.net)
        gen = torch.Generator().manual_seed(seed + n)
        with torch.no_grad():
            for layer in experts.lora_layers(m.net).values():
                for up in layer.lora_up:  # non-zero updates (a zero-initialised U would make every expert the same)
                    up.copy_(0.02 * torch.randn(up.shape, generator=gen))
        m.expert_layout = layout
        m.expert_records = [{"expert": e, "classes": group, "domains": ["ct"]}
                            for e, group in enumerate(split_classes(n))]
        _save(m, folder / f"experts_{n}.ckpt")
    per_expert = experts.expert_parameter_count(module.net, rank, layout["layers"])
    macs = conv_macs(module.net, layout["layers"])
    return {"network_parameters": network, "expert_parameters": per_expert,
            "expert_percent": 100.0 * per_expert / network, "conv_macs_per_window": macs}


def conv_macs(net, patterns: list[str], roi: int = 64) -> dict[str, int]:
    """Multiply-adds of the network's 3D convolutions for one ``roi``^3 window, split into the layers that carry
    experts (run once per expert) and the others (the encoder and bottleneck: run once per window with the prefix
    cache; the head's prototype projection is not counted)."""
    import math

    import torch
    from torch import nn

    from cfseg.continual import experts

    chosen = set(experts.resolve_expert_layers(net, patterns))
    count = {"expert_layers": 0, "other_layers": 0}

    def hook(name: str):
        def fn(m, inputs, out):
            k = math.prod(m.kernel_size) // m.groups
            macs = inputs[0].numel() * m.out_channels * k if isinstance(m, nn.ConvTranspose3d) \
                else out.numel() * m.in_channels * k
            count["expert_layers" if name in chosen else "other_layers"] += macs
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in net.named_modules()
               if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    try:
        with torch.no_grad():
            net.backbone(torch.zeros(1, 1, roi, roi, roi))
    finally:
        for h in handles:
            h.remove()
    return count


# ----------------------------------------------------------------------------------------------------------
# Workers (fresh interpreters)
# ----------------------------------------------------------------------------------------------------------
def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _status_mib(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` (None where there is no procfs)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Release free heap memory to the OS (glibc ``malloc_trim``) and reset the peak RSS (``VmHWM``) to the current
    RSS (``/proc/self/clear_refs``, Linux >= 4.0). False when the peak cannot be reset."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_mib("VmHWM") is not None


@contextmanager
def _no_cache(_net):
    yield None


def _runners(cfg: dict[str, Any], cases: list[str]) -> tuple[dict[str, Any], list[int]]:
    """Callables ``() -> logits`` per case, and a one-element counter of encoder passes."""
    import torch

    torch.set_num_threads(cfg["threads"])
    from cfseg.continual import experts
    from cfseg.module import load_checkpoint

    folder = Path(cfg["folder"])
    gen = torch.Generator().manual_seed(0)
    image = torch.rand((1, 1, *cfg["shape"]), generator=gen)
    passes = [0]

    def load(name: str):
        m = load_checkpoint(str(folder / name)).eval()
        first = m.net.backbone.model[0].conv  # runs once per encoder pass (not when the prefix cache hits)
        first.register_forward_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
        return m

    n = cfg["n"]
    plain = load("plain.ckpt") if "plain" in cases else None
    module = load(f"experts_{n}.ckpt") if n > 1 and set(cases) - {"plain"} else None
    if module is not None and module.n_experts != n:
        raise RuntimeError(f"experts_{n}.ckpt loaded with {module.n_experts} experts")
    last = [len(CLASSES)]  # global index of the last class (background is 0)

    def run_all():
        return module.sliding_window_logits(image)

    def run_nocache():
        original = experts.shared_prefix_cache
        experts.shared_prefix_cache = _no_cache
        try:
            return module.sliding_window_logits(image)
        finally:
            experts.shared_prefix_cache = original

    table = {"plain": lambda: plain.sliding_window_logits(image), "all": run_all, "all_nocache": run_nocache,
             "one": lambda: module.sliding_window_logits(image, last)}
    return {c: table[c] for c in cases}, passes


def worker_time(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    cases = cfg["cases"]
    runners, passes = _runners(cfg, cases)
    out: dict[str, Any] = {c: {"wall": [], "cpu": [], "encoder_passes": None} for c in cases}
    with torch.no_grad():
        for c in cases:  # warm-up (and the merged-weight caches), counting encoder passes
            before = passes[0]
            runners[c]()
            out[c]["encoder_passes"] = passes[0] - before
        for _ in range(cfg["reps"]):
            for c in cases:
                t0, c0 = time.perf_counter(), time.process_time()
                runners[c]()
                out[c]["wall"].append(time.perf_counter() - t0)
                out[c]["cpu"].append(time.process_time() - c0)
    return out


def worker_memory(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    runners, _ = _runners(cfg, [cfg["case"]])
    if _reset_peak():  # peak RSS of the inference itself, over the RSS just before it
        method, base = "VmHWM after clear_refs, over VmRSS before", _status_mib("VmRSS")
    else:  # fall back to the process's lifetime peak (loading the checkpoint may already have set it)
        method, base = "ru_maxrss growth", _maxrss_mib()
    with torch.no_grad():
        logits = runners[cfg["case"]]()
    peak = _status_mib("VmHWM") if method.startswith("VmHWM") else _maxrss_mib()
    return {"method": method, "baseline_mib": base, "peak_mib": peak, "growth_mib": peak - base,
            "output_shape": list(logits.shape)}


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------
def _spawn(mode: str, cfg: dict[str, Any]) -> dict[str, Any]:
    threads = str(cfg["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--_worker", mode, json.dumps(cfg)], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {mode} {cfg} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    ns = sorted(set(args.experts))
    for n in ns:
        split_classes(n)
    started = time.time()
    load_before = _loadavg()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cfseg-experts-cost-") as tmp:
        params = prepare(Path(tmp), ns, args.seed, args.layout, args.rank)
        base = {"folder": tmp, "threads": args.threads, "shape": list(args.shape)}
        for n in ns:
            cases = ["plain"] if n == 1 else list(CASES)
            timed = _spawn("time", {**base, "n": n, "cases": cases, "reps": args.reps})
            groups = split_classes(n)
            for c in cases:
                wall, cpu = timed[c]["wall"], timed[c]["cpu"]
                paired = [w / p for w, p in zip(wall, timed["plain"]["wall"], strict=True)]
                paired_cpu = [w / p for w, p in zip(cpu, timed["plain"]["cpu"], strict=True)]
                mem = [_spawn("memory", {**base, "n": n, "case": c}) for _ in range(args.mem_repeats)]
                rows.append({
                    "experts": n, "case": c,
                    "classes_requested": 1 if c == "one" else len(CLASSES),
                    "experts_run": 1 if c in ("plain", "one") else n,
                    "classes_per_expert": [len(g) for g in groups] if c in ("all", "all_nocache") else None,
                    "wall_s": wall, "cpu_s": cpu, "median_s": statistics.median(wall),
                    "min_s": min(wall), "median_cpu_s": statistics.median(cpu),
                    "paired_ratio_to_plain": statistics.median(paired),
                    "paired_cpu_ratio_to_plain": statistics.median(paired_cpu),
                    "encoder_passes": timed[c]["encoder_passes"],
                    "peak_rss_growth_mib": statistics.median(m["growth_mib"] for m in mem),
                    "memory_runs": mem,
                })
                print(f"n={n} {c}: {rows[-1]['median_s']:.2f} s ({rows[-1]['paired_ratio_to_plain']:.2f}x plain), "
                      f"+{rows[-1]['peak_rss_growth_mib']:.0f} MiB", flush=True)
    return {
        "command": "OMP_NUM_THREADS=1 python benchmarks/experts_cost.py " + " ".join(args.argv),
        "date": time.strftime("%Y-%m-%d"), "duration_s": round(time.time() - started, 1),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor()
        or platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "loadavg_before": load_before, "loadavg_after": _loadavg(),
        "shape": list(args.shape), "roi": [64, 64, 64], "sw_batch_size": 2, "overlap": 0.25, "reps": args.reps,
        "mem_repeats": args.mem_repeats, "classes": CLASSES, "layout": args.layout, "rank": args.rank,
        "alpha": float(args.rank), **params, "rows": rows,
    }


CASE_TEXT = {"plain": "plain network (no experts)", "all": "all classes, every expert (prefix cache)",
             "all_nocache": "all classes, every expert, no prefix cache", "one": "one class (one expert)"}


def _paired(res_rows: dict[tuple[int, str], dict[str, Any]], n: int, case: str, base: str, key: str) -> float:
    """Median over rounds of ``case`` / ``base`` (``key``: ``wall_s`` or ``cpu_s``), both timed in one round."""
    a, b = res_rows[(n, case)][key], res_rows[(n, base)][key]
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def markdown(res: dict[str, Any]) -> str:
    rows = {(r["experts"], r["case"]): r for r in res["rows"]}
    ns = sorted({r["experts"] for r in res["rows"]} - {1})
    lines = [
        "# LoRA experts: whole-volume inference cost",
        "",
        "Regenerate (about 10 min on a loaded 2-core machine; `--render benchmarks/experts_cost.json` rewrites "
        "only this file from the saved numbers):",
        "",
        "```",
        res["command"],
        "```",
        "",
        f"{res['date']}, torch {res['torch']}, {res['cpu_count']}-core {res['machine']}, {res['threads']} torch "
        f"thread, load average {res['loadavg_before'][0]} before / {res['loadavg_after'][0]} after: other jobs "
        f"shared the two cores, so a worker waited for a core part of the time (wall time above CPU time) and "
        f"absolute times drift between processes; compare the paired ratios, and prefer the CPU-time ones, which "
        f"leave the waiting out. Method: see the docstring of `benchmarks/experts_cost.py`.",
        "",
        f"OpenKBP network (UNet 16-32-64-128-256, 16 features, prototype head), random volume "
        f"{'x'.join(map(str, res['shape']))}, roi 64^3, sw_batch_size 2, overlap 0.25 (8 windows, 4 window "
        f"batches); {len(res['classes'])} classes split evenly across the experts (class-incremental: each expert "
        f"serves its own classes); median of {res['reps']} runs after one warm-up, cases interleaved. \"vs plain\": "
        f"median of the per-round ratios to the plain network timed in the same process (wall / CPU time). "
        f"\"encoder passes\": runs of the encoder's first convolution per volume (4 window batches). Peak RSS "
        f"growth: peak resident set size during one inference in a fresh process (`VmHWM`, reset through "
        f"`/proc/self/clear_refs` after `malloc_trim`) minus the RSS just before it; median of "
        f"{res['mem_repeats']} process(es). The prototype head computes only the requested classes, so one class "
        f"costs a little less than the plain network's 8.",
        "",
        f"One expert (rank {res['rank']} on {LAYOUT_TEXT[res.get('layout', 'decoder')]}) adds "
        f"{res['expert_parameters']:,} parameters, {res['expert_percent']:.2f}% of the network's "
        f"{res['network_parameters']:,}.",
        "",
        "| experts | case | classes requested | experts run | encoder passes / volume | wall (s) | CPU (s) | "
        "vs plain, wall | vs plain, CPU | peak RSS growth (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        n, c = r["experts"], r["case"]
        lines.append(f"| {n} | {CASE_TEXT[c]} | {r['classes_requested']} | {r['experts_run']} | "
                     f"{r['encoder_passes']} | {r['median_s']:.2f} | {r['median_cpu_s']:.2f} | "
                     f"{_paired(rows, n, c, 'plain', 'wall_s'):.2f}x | {_paired(rows, n, c, 'plain', 'cpu_s'):.2f}x | "
                     f"{r['peak_rss_growth_mib']:.0f} |")
    lines += ["", "Summary (CPU-time paired ratios):", ""]
    for n in ns:
        ratio = _paired(rows, n, "all", "plain", "cpu_s")
        saving = 1 - _paired(rows, n, "all", "all_nocache", "cpu_s")
        lines.append(f"- {n} experts, all classes: {ratio:.2f}x the plain network, {(ratio - 1) / (n - 1):.2f} of a "
                     f"plain pass per added expert; the prefix cache saves {100 * saving:.0f}% against running the "
                     f"encoder once per expert; one class (one expert): "
                     f"{_paired(rows, n, 'one', 'plain', 'cpu_s'):.2f}x.")

    def encoder_share(n: int) -> float:  # per round: (uncached - cached) / plain / (n - 1); median
        a, b, p = (rows[(n, c)]["cpu_s"] for c in ("all", "all_nocache", "plain"))
        return statistics.median((y - x) / z / (n - 1) for x, y, z in zip(a, b, p, strict=True))

    macs = res["conv_macs_per_window"]
    total = macs["expert_layers"] + macs["other_layers"]
    shares = ", ".join(f"{100 * encoder_share(n):.0f}% at {n}" for n in ns)
    every = res.get("layout") == "every"
    carriers = "every convolution" if every else "the decoder's transposed convolutions"
    whole = "the whole network" if every else "the decoder"
    rest = ("no convolution is left for the prefix cache to run once, so it saves nothing" if every else
            f"the encoder and bottleneck, which the prefix cache runs once, "
            f"{100 * macs['other_layers'] / total:.0f}%")
    lines += ["", f"Where the time goes: per 64^3 window the convolutions that carry experts ({carriers}) take "
              f"{macs['expert_layers'] / 1e9:.2f} of the convolutions' "
              f"{total / 1e9:.2f} G multiply-adds ({100 * macs['expert_layers'] / total:.0f}%); {rest}. In CPU "
              f"time the encoder's share of a plain pass, estimated per round as (uncached - cached) / plain / "
              f"(n - 1) (median; noisy on a loaded machine), is {shares} experts. Each expert repeats {whole} "
              f"with its normalisations and activations, the prototype head, the log-softmax and the log-odds "
              f"merge, so the time grows about linearly with the number of experts that serve the requested "
              f"classes; memory grows much less (the experts run one after another on each window batch)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_worker"]:
        mode, cfg = argv[1], json.loads(argv[2])
        print(json.dumps(worker_time(cfg) if mode == "time" else worker_memory(cfg)))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, nargs="+", default=[1, 2, 4, 8], help="numbers of experts (incl. 0)")
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 80], help="volume grid")
    p.add_argument("--reps", type=int, default=3, help="timed runs per case (after one warm-up)")
    p.add_argument("--mem-repeats", type=int, default=1, help="fresh processes per memory measurement")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="decoder", help="which convolutions carry experts")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank)")
    p.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    p.add_argument("--render", default=None, metavar="JSON", help="only rewrite the markdown of a saved result")
    args = p.parse_args(argv)
    if args.render:
        text = markdown(json.loads(Path(args.render).read_text()))
        Path(args.render).with_suffix(".md").write_text(text)
        print(text)
        return 0
    args.argv = argv
    res = run(args)
    text = markdown(res)
    print(text)
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(res, indent=2) + "\n")
        Path(f"{args.out}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
