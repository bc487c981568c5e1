"""Whole-volume inference cost: ``cfseg.segment`` against a plain MONAI softmax pipeline on the same backbone.

Both sides segment one CT NIfTI end to end and return per-class uint8 masks in the input's own geometry:

* **cfseg**: :func:`cfseg.segmentation.segment` with a :class:`cfseg.module.CFSegModule` (prototype head,
  ``minilm`` prototypes of the 7 OpenKBP organs, random weights: timing does not depend on training). It loads
  the NIfTI, reorients/resamples/windows it as the module's preprocessing says, runs Gaussian sliding windows
  over background plus the requested classes, resamples back to the input grid and splits the masks.
* **MONAI**: what a plain MONAI user writes: ``LoadImaged`` -> ``Orientationd`` -> ``Spacingd`` ->
  ``ScaleIntensityRanged``, ``monai.inferers.sliding_window_inference`` (same roi, overlap, batch, mode) with a
  :class:`cfseg.nets.SoftmaxSegmenter` (the same backbone weights, a ``1x1x1`` conv to ``K+1`` logits), softmax
  + argmax to uint8, ``Invertd`` (nearest) back onto the input grid, one mask per class. For a class subset the
  softmax head still computes all ``K+1`` channels and keeps the requested masks.

Protocol (one fresh interpreter per measurement, ``--threads`` torch threads):

* Time: one process per class set holds both pipelines, warms each up once, then alternates them (ABAB) for
  ``--reps`` pairs, so that load from other jobs hits both alike. Reported: the medians of wall time, the ratio
  of the medians, the median of the per-pair ratios, the ratio of the minima (the least disturbed run of each),
  and the ratio of the median process CPU times (less sensitive to waiting for a core on a loaded machine).
* Peak memory: one process per (pipeline, class set); peak RSS growth (``ru_maxrss``) during one segmentation
  over its value after imports and model loading. The module is written to a cfseg checkpoint by a separate
  process first, so the text encoder never inflates the workers' baseline.

Example::

    python benchmarks/inference.py --image ../shared/data/openkbp_oar/imagesTr/openkbp_001_0000.nii.gz \\
        --reps 5 --threads 2 --out benchmarks/results/inference
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
from pathlib import Path
from typing import Any

DEFAULT_IMAGE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "openkbp_oar" / "imagesTr" / (
    "openkbp_001_0000.nii.gz")
OPENKBP_CLASSES = ["brainstem", "spinal_cord", "parotid_gland_right", "parotid_gland_left", "esophagus", "larynx",
                   "mandible"]
SUBSET = ["brainstem", "mandible"]
DEMO_BACKBONE: dict[str, Any] = {  # configs/demo.yaml
    "class_path": "monai.networks.nets.UNet",
    "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 16, "channels": [8, 16, 32, 64, 128],
                  "strides": [2, 2, 2, 2], "num_res_units": 0},
}
KINDS = ("cfseg", "monai")


# ----------------------------------------------------------------------------------------------------------
# Worker side (fresh interpreter)
# ----------------------------------------------------------------------------------------------------------
def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _prepare(cfg: dict[str, Any]) -> None:
    """Build the cfseg module (text encoder included) and save it as a cfseg checkpoint."""
    import torch

    from cfseg.data.transforms import Preprocessing
    from cfseg.module import CFSegModule

    torch.manual_seed(cfg["seed"])
    pre = Preprocessing("ct", spacing=tuple(cfg["spacing"]), orientation="RAS", ct_window=tuple(cfg["ct_window"]))
    module = CFSegModule(
        class_names=OPENKBP_CLASSES, backbone=cfg["backbone"], feature_channels=cfg["feature_channels"],
        head="prototype", encoder="minilm", roi_size=tuple(cfg["roi"]), sw_batch_size=cfg["sw_batch_size"],
        sw_overlap=cfg["overlap"], preprocessing={"ct": pre.to_dict()},
    )
    ckpt: dict[str, Any] = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, cfg["ckpt"])


class MonaiPipeline:
    """A plain MONAI softmax-head pipeline: transforms, sliding windows, softmax/argmax, ``Invertd``."""

    def __init__(self, cfseg_module, cfg: dict[str, Any]):
        import torch
        from monai.transforms import (
            Compose,
            EnsureTyped,
            Invertd,
            LoadImaged,
            Orientationd,
            ScaleIntensityRanged,
            Spacingd,
        )

        from cfseg.builder import build_network
        from cfseg.nets import SoftmaxSegmenter

        torch.manual_seed(cfg["seed"] + 1)
        self.net = SoftmaxSegmenter(build_network(cfg["backbone"]), cfg["feature_channels"], len(OPENKBP_CLASSES) + 1)
        self.net.backbone.load_state_dict(cfseg_module.net.backbone.state_dict())  # the same backbone weights
        self.net.eval()
        self.cfg = cfg
        lo, hi = cfg["ct_window"]
        self.pre = Compose([
            LoadImaged("image", image_only=True, ensure_channel_first=True),
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=cfg["spacing"], mode="bilinear"),
            ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
            EnsureTyped("image", dtype=torch.float32),
        ])
        self.post = Invertd("pred", transform=self.pre, orig_keys="image", nearest_interp=True, to_tensor=True)

    def __call__(self, path: str, classes: list[str] | None = None):
        import nibabel as nib
        import numpy as np
        import torch
        from monai.inferers import sliding_window_inference

        cfg = self.cfg
        data = self.pre({"image": path})
        with torch.no_grad():
            logits = sliding_window_inference(
                data["image"][None], roi_size=tuple(cfg["roi"]), sw_batch_size=cfg["sw_batch_size"],
                predictor=self.net, overlap=cfg["overlap"], mode="gaussian",
            )
        data["pred"] = logits[0].softmax(0).argmax(0, keepdim=True).to(torch.uint8)  # [1, *S], image's meta
        labels = self.post(data)["pred"]
        arr = np.asarray(labels.as_tensor()[0].numpy(), dtype=np.uint8)
        affine = labels.affine.numpy()
        wanted = classes or OPENKBP_CLASSES
        return {c: nib.Nifti1Image((arr == OPENKBP_CLASSES.index(c) + 1).astype(np.uint8), affine) for c in wanted}


def _load(cfg: dict[str, Any], kinds: list[str]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(cfg["threads"])
    import nibabel  # noqa: F401  (imports before the memory baseline)
    import scipy.ndimage  # noqa: F401

    from cfseg.module import load_checkpoint
    from cfseg.segmentation import segment

    module = load_checkpoint(cfg["ckpt"])
    runners: dict[str, Any] = {}
    if "cfseg" in kinds:
        runners["cfseg"] = lambda path, classes: segment(path, module, classes=classes)
    if "monai" in kinds:
        runners["monai"] = MonaiPipeline(module, cfg)
    return runners


def _check(out: dict[str, Any], path: str, classes: list[str] | None) -> None:
    import nibabel as nib
    import numpy as np

    src = nib.load(path)
    assert sorted(out) == sorted(classes or OPENKBP_CLASSES), sorted(out)
    for img in out.values():
        assert img.shape == src.shape and np.allclose(img.affine, src.affine, atol=1e-4), (img.shape, img.affine)


def _worker_time(cfg: dict[str, Any]) -> dict[str, Any]:
    runners = _load(cfg, list(KINDS))
    classes = cfg["classes"]
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    cpu: dict[str, list[float]] = {k: [] for k in KINDS}
    for kind in KINDS:  # warm-up, and a geometry check of both outputs
        _check(runners[kind](cfg["image"], classes), cfg["image"], classes)
    for _ in range(cfg["reps"]):
        for kind in KINDS:  # ABAB
            t0, c0 = time.perf_counter(), time.process_time()
            runners[kind](cfg["image"], classes)
            times[kind].append(time.perf_counter() - t0)
            cpu[kind].append(time.process_time() - c0)
    return {"times": times, "cpu": cpu}


def _worker_memory(cfg: dict[str, Any]) -> dict[str, Any]:
    kind = cfg["kind"]
    runners = _load(cfg, [kind])
    base = _maxrss_mib()
    runners[kind](cfg["image"], cfg["classes"])
    return {"baseline_mib": base, "peak_mib": _maxrss_mib(), "growth_mib": _maxrss_mib() - base}


# ----------------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------------
def _spawn(mode: str, cfg: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "MKL_NUM_THREADS": str(cfg["threads"])}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--_worker", mode, json.dumps(cfg)], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {mode} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) if mode != "prepare" else {}


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x"


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    image = Path(args.image)
    if not image.is_file():
        print(f"SKIP: input CT {image} not found (expected an OpenKBP case such as "
              "../shared/data/openkbp_oar/imagesTr/openkbp_001_0000.nii.gz); give one with --image")
        return None
    import nibabel as nib

    src = nib.load(str(image))
    spacing = [float(v) for v in (args.spacing or src.header.get_zooms()[:3])]
    from cfseg.data.transforms import CT_WINDOW

    ct_window = list(args.ct_window or CT_WINDOW)
    load_before = _loadavg()
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="cfseg-bench-") as tmp:
        cfg: dict[str, Any] = {
            "image": str(image.resolve()), "spacing": spacing, "ct_window": ct_window,
            "backbone": json.loads(args.backbone) if args.backbone else DEMO_BACKBONE,
            "feature_channels": args.feature_channels, "roi": [args.roi] * 3, "sw_batch_size": args.sw_batch_size,
            "overlap": args.overlap, "threads": args.threads, "reps": args.reps, "seed": 0,
            "ckpt": str(Path(tmp) / "cfseg-bench.ckpt"),
        }
        _spawn("prepare", cfg)
        rows = []
        for label, classes in (("all 7 classes", None), ("2 classes (brainstem, mandible)", SUBSET)):
            c = {**cfg, "classes": classes}
            print(f"[{label}] timing ({args.reps} ABAB reps)...", flush=True)
            res = _spawn("time", c)
            t, cpu = res["times"], res["cpu"]
            mem = {}
            for kind in KINDS:
                print(f"[{label}] peak memory of {kind}...", flush=True)
                mem[kind] = _spawn("memory", {**c, "kind": kind})
            med = {k: statistics.median(v) for k, v in t.items()}
            pairs = [a / b for a, b in zip(t["cfseg"], t["monai"], strict=True)]
            rows.append({
                "classes": label, "times_s": t, "median_s": med, "min_s": {k: min(v) for k, v in t.items()},
                "ratio_of_medians": med["cfseg"] / med["monai"], "median_pair_ratio": statistics.median(pairs),
                "ratio_of_minima": min(t["cfseg"]) / min(t["monai"]),
                "cpu_s": cpu, "cpu_median_s": {k: statistics.median(v) for k, v in cpu.items()},
                "cpu_ratio_of_medians": statistics.median(cpu["cfseg"]) / statistics.median(cpu["monai"]),
                "memory": mem,
                "memory_ratio": mem["cfseg"]["growth_mib"] / mem["monai"]["growth_mib"],
            })
    result = {
        "image": str(image), "shape": list(src.shape), "input_spacing": [float(v) for v in src.header.get_zooms()[:3]],
        "config": {k: v for k, v in cfg.items() if k not in ("ckpt", "image")},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "loadavg_before": load_before, "loadavg_after": _loadavg(), "wall_s": round(time.time() - t_start, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": rows,
    }
    md = _markdown(result)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(md)
    return result


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        f"Input `{Path(r['image']).name}` {tuple(r['shape'])}, spacing {tuple(round(s, 3) for s in r['input_spacing'])}"
        f" mm; {r['config']['threads']} torch threads; load average before/after "
        f"{r['loadavg_before']} / {r['loadavg_after']}.",
        "",
        "| classes | cfseg median s | MONAI median s | ratio of medians | median pair ratio | ratio of minima "
        "| CPU-time ratio of medians | cfseg peak MiB | MONAI peak MiB | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        m, mem = row["median_s"], row["memory"]
        lines.append(
            f"| {row['classes']} | {m['cfseg']:.2f} | {m['monai']:.2f} | {row['ratio_of_medians']:.3f}x "
            f"| {row['median_pair_ratio']:.3f}x | {row['ratio_of_minima']:.3f}x | {row['cpu_ratio_of_medians']:.3f}x "
            f"| {mem['cfseg']['growth_mib']:.0f} | {mem['monai']['growth_mib']:.0f} | {row['memory_ratio']:.3f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_worker":
        mode, cfg = argv[1], json.loads(argv[2])
        if mode == "prepare":
            _prepare(cfg)
            return 0
        res = _worker_time(cfg) if mode == "time" else _worker_memory(cfg)
        print(json.dumps(res))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default=str(DEFAULT_IMAGE.resolve()), help="CT NIfTI (default: OpenKBP case 001)")
    p.add_argument("--reps", type=int, default=5, help="timed ABAB pairs after one warm-up each")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    p.add_argument("--spacing", type=float, nargs=3, default=None, help="network spacing (default: the image's)")
    p.add_argument("--ct-window", type=float, nargs=2, default=None,
                   help="HU window mapped to [0, 1] (default: cfseg's CT_WINDOW)")
    p.add_argument("--backbone", default=None, help="backbone spec as JSON (default: configs/demo.yaml's UNet)")
    p.add_argument("--feature-channels", type=int, default=16, help="backbone output channels F")
    p.add_argument("--roi", type=int, default=64, help="sliding-window size (cubic)")
    p.add_argument("--sw-batch-size", type=int, default=2)
    p.add_argument("--overlap", type=float, default=0.25)
    args = p.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
