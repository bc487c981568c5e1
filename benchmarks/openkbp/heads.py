"""Segmentation heads side by side on OpenKBP joint training (issue 14, item 5): accuracy, surface distances, size,
speed, and whether a class can be added later.

Every checkpoint is one head trained with the same backbone, data and budget; several seeds per head::

    c=logs/version_0/checkpoints/joint.ckpt
    python benchmarks/openkbp/heads.py --ckpt prototype:0=results/heads/prototype_s0/$c \\
        --ckpt prototype:1=results/heads/prototype_s1/$c --ckpt softmax:0=results/heads/softmax_s0/$c ... \\
        --workers 2 --out benchmarks/openkbp

or, for the layout ``<results>/<head>_s<seed>/logs/version_0/checkpoints/joint.ckpt``::

    python benchmarks/openkbp/heads.py --results results/heads --heads prototype softmax dodnet universal --seeds 0 1

What it measures (writes ``<out>/heads.md``, ``heads.json``, ``heads.png``):

* **Dice** per class on the committed test split (40 cases), each case scored only on the classes annotated for it
  (:data:`cfseg.metrics.DICE_CONVENTION`); mean over classes; per seed, and the mean over seeds +- half the range
  over seeds (for two seeds this equals the population standard deviation).
* **HD95** (MONAI ``compute_hausdorff_distance(percentile=95)``, symmetric, Euclidean) and **surface Dice**
  (MONAI ``compute_surface_dice``, tolerance ``--tolerance-mm``, 2 mm by default) per class, on the network's
  voxel grid with ``spacing`` = that grid's voxel size in mm (the column norms of the preprocessed volume's affine;
  4 x 4 x 3 mm for OpenKBP). Empty masks: HD95 is undefined when the prediction or the ground truth of an annotated
  class is empty; such (case, class) pairs are left out of the HD95 mean and counted (``hd95_excluded``); surface
  Dice follows the Dice convention (both empty: 1; one empty: 0).
* **Parameters**: of ``module.net`` (backbone + head) and of ``module.net.head`` alone. Buffers are not counted
  (the prototype bank and the text embeddings are buffers: they grow with the vocabulary, not with training).
* **Whole-volume inference** time per case with :func:`cfseg.inference.predict_volume` (sliding windows, stitching,
  labels), every class and one class (the first of the vocabulary), on ``--time-cases`` test cases; the heads run
  interleaved in one process with ``--threads`` torch threads; median over cases.
* **Training step** time: forward + the head's own loss + backward + AdamW step, on the same random batch
  (``--step-batch`` x 1 x ``--step-patch``^3, every class annotated) for every head, interleaved (order reversed
  every repetition, as in ``benchmarks/head_cost.py``); median over ``--step-reps`` after ``--step-warmup``.
  (The Lightning CSV logs of the runs hold only the loss, no step times.)
* **Peak memory** (Linux): the resident memory a training step, an all-class and a one-class whole-volume
  inference add at their peak, each run once in a fresh process (``--no-memory`` skips it; see
  :data:`MEMORY_CONVENTION`).
* **Can a class be added later**: from the head's ``open_vocabulary`` attribute and its layers.

Scoring (predicting every test volume) is the expensive part. Each checkpoint's per-case metrics are cached in
``<checkpoint stem>.heads_eval.json`` beside the checkpoint (or in ``--cache-dir``), keyed on the checkpoint file's
size and modification time and on the data, split, classes and tolerance; a rerun or an added checkpoint computes
only what is missing, and an interrupted run keeps the finished cases. ``--workers N`` scores checkpoints in N
processes (one torch thread each). ``--max-cases N`` scores only the first N test cases (quick check).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "openkbp_oar"
SPLIT = ROOT / "configs" / "openkbp" / "split_joint.json"
CHECKPOINT_LAYOUT = "{results}/{head}_s{seed}/logs/version_0/checkpoints/joint.ckpt"
CACHE_VERSION = 1
SPREAD = "half the range over seeds (for two seeds equal to the population standard deviation)"
HD95_CONVENTION = ("HD95: MONAI compute_hausdorff_distance(percentile=95), symmetric, Euclidean, in mm on the network "
                   "grid; a (case, class) with an empty prediction or an empty ground truth is excluded from the mean "
                   "and counted")
NSD_CONVENTION = ("surface Dice: MONAI compute_surface_dice at a tolerance of {tol:g} mm on the network grid; both "
                  "empty: 1, only one empty: 0 (as for Dice)")


# ----------------------------------------------------------------------------------------------------------
# Metrics of one case (functional core)
# ----------------------------------------------------------------------------------------------------------
def voxel_spacing(affine: Any) -> tuple[float, ...]:
    """Voxel size in mm along each array axis: the column norms of the affine's ``[:3, :3]`` block."""
    a = np.asarray(torch.as_tensor(affine, dtype=torch.float64))
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))


def case_metrics(pred: torch.Tensor, gt: torch.Tensor, classes: Sequence[int], spacing: Sequence[float],
                 tolerance_mm: float) -> dict[int, dict[str, Any]]:
    """Dice, HD95 and surface Dice of each class of one case.

    Args:
        pred: predicted label map ``[*S]`` (int, global class indices).
        gt: ground-truth label map ``[*S]``.
        classes: class indices to score (the ones annotated in the case).
        spacing: voxel size in mm per axis of ``[*S]``.
        tolerance_mm: surface Dice tolerance.

    Returns:
        ``{k: {"dice", "hd95_mm", "surface_dice", "pred_voxels", "gt_voxels"}}``; ``hd95_mm`` is None when the
        prediction or the ground truth is empty (undefined); Dice and surface Dice are 1 when both are empty and
        0 when only one is (:data:`cfseg.metrics.DICE_CONVENTION`).
    """
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    from cfseg.metrics import dice_per_class

    pred, gt = torch.as_tensor(pred).long(), torch.as_tensor(gt).long()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
    if len(spacing) != pred.dim():
        raise ValueError(f"spacing {tuple(spacing)} does not match a {pred.dim()}-d label map")
    classes = [int(k) for k in classes]
    dice = dice_per_class(pred, gt, classes).tolist()
    out: dict[int, dict[str, Any]] = {}
    both = []
    for k, d in zip(classes, dice, strict=True):
        n_p, n_g = int((pred == k).sum()), int((gt == k).sum())
        nsd = 1.0 if n_p == 0 and n_g == 0 else (0.0 if n_p == 0 or n_g == 0 else None)
        out[k] = {"dice": float(d), "hd95_mm": None, "surface_dice": nsd, "pred_voxels": n_p, "gt_voxels": n_g}
        if n_p and n_g:
            both.append(k)
    if both:
        yp = torch.stack([pred == k for k in both])[None].float()  # [1, C, *S] one-hot channels
        yt = torch.stack([gt == k for k in both])[None].float()
        sp = [float(s) for s in spacing]
        with warnings.catch_warnings():  # MONAI 1.5+ warns about its own get_mask_edges argument
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*always_return_as_numpy")
            hd = compute_hausdorff_distance(yp, yt, include_background=True, percentile=95, spacing=sp)[0]
            nsd = compute_surface_dice(yp, yt, [float(tolerance_mm)] * len(both), include_background=True,
                                       spacing=sp)[0]
        for i, k in enumerate(both):
            out[k]["hd95_mm"] = float(hd[i])
            out[k]["surface_dice"] = float(nsd[i])
    return out


# ----------------------------------------------------------------------------------------------------------
# Checkpoints, test cases, cache
# ----------------------------------------------------------------------------------------------------------
def parse_ckpt(spec: str) -> tuple[str, str, Path]:
    """``name:seed=path`` -> (name, seed, path)."""
    m = re.fullmatch(r"([^:=]+):([^:=]+)=(.+)", spec)
    if not m:
        raise ValueError(f"--ckpt must be name:seed=path (e.g. prototype:0=results/heads/prototype_s0/.../joint.ckpt), "
                         f"got {spec!r}")
    return m.group(1), m.group(2), Path(m.group(3))


def can_add_class(head: torch.nn.Module) -> str:
    """Whether (and at what cost) a class can be added after training, from the head's interface and layers."""
    name = type(head).__name__
    if getattr(head, "open_vocabulary", False):
        what = {"PrototypeHead": "a new text prototype (one bank row, orthogonalised against the old ones)",
                "UniversalHead": "a new text embedding (one row)"}.get(name, "a new class vector")
        return f"yes: {what}; no new parameters"
    classifier = getattr(head, "classifier", None)
    if isinstance(classifier, torch.nn.Conv3d | torch.nn.Conv2d | torch.nn.Conv1d):
        n = classifier.in_channels + (1 if classifier.bias is not None else 0)
        return f"no: a new output channel (classifier row, +{n} parameters); retrain"
    controller = getattr(head, "controller", None)
    if name == "DoDNetHead" and isinstance(controller, torch.nn.Linear):
        return (f"no: only by growing the one-hot class code (controller input +1, +{controller.out_features} "
                "parameters); retrain")
    return "no: the head's layers fix the class count; retrain"


def model_info(module: Any) -> dict[str, Any]:
    """Head class, output kind, vocabulary, parameter counts and the can-add-a-class answer of a loaded module."""
    head = module.net.head
    return {
        "head_class": f"{type(head).__module__}.{type(head).__name__}",
        "output": head.output,
        "open_vocabulary": bool(head.open_vocabulary),
        "classes": list(module.class_names),
        "params": int(sum(p.numel() for p in module.net.parameters())),
        "head_params": int(sum(p.numel() for p in head.parameters())),
        "can_add_class": can_add_class(head),
    }


def load_test_cases(module: Any, data: Path, split_file: Path | None, max_cases: int | None, part: str = "test"):
    """(transform, items) of the ``part`` split (test by default), preprocessed as the checkpoint was trained (as
    ``evaluate_groups``)."""
    from cfseg.data.datamodule import DatasetConfig, SegDataModule
    from cfseg.data.transforms import build_transforms

    pre = next(iter(module.preprocessing.values()))
    cfg = DatasetConfig(path=str(data), split_file=str(split_file) if split_file else None)
    dm = SegDataModule([cfg], classes=module.class_names, spacing=tuple(pre["spacing"]),
                       ct_window=tuple(pre.get("ct_window", (-175.0, 250.0))), cache="none", seed=0)
    ds = dm.datasets[0]
    items = dm.items(ds, part)
    if not items:
        raise ValueError(f"{data}: no {part} cases (split file {split_file}); give a split file with a {part!r} list")
    if max_cases is not None:
        items = items[:max_cases]
    return build_transforms(dm.preprocessing(ds.info.modality), train=False), items


def cache_path(ckpt: Path, cache_dir: Path | None, part: str = "test") -> Path:
    """Where a checkpoint's per-case metrics on the ``part`` cases are cached (test: no part in the name)."""
    suffix = "" if part == "test" else f".{part}"
    if cache_dir is None:
        return ckpt.with_name(ckpt.stem + suffix + ".heads_eval.json")
    digest = hashlib.sha1(str(ckpt.resolve()).encode()).hexdigest()[:10]
    return cache_dir / f"{ckpt.parent.name}_{ckpt.stem}_{digest}{suffix}.heads_eval.json"


def cache_key(ckpt: Path, data: Path, split_file: Path | None, classes: Sequence[str] | None,
              tolerance_mm: float, part: str = "test") -> dict[str, Any]:
    st = ckpt.stat()
    split_hash = hashlib.sha1(split_file.read_bytes()).hexdigest() if split_file else None
    key = {"version": CACHE_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "data": str(data.resolve()),
           "split_sha1": split_hash, "classes": list(classes) if classes else None, "tolerance_mm": tolerance_mm}
    return key if part == "test" else {**key, "part": part}  # test keys as before: earlier caches stay valid


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False))
    tmp.replace(path)  # atomic: a reader never sees half a file


def score_checkpoint(job: dict[str, Any]) -> dict[str, Any]:
    """Per-case metrics of one checkpoint on the test cases, computing only the cases its cache lacks.

    ``job``: ``ckpt``, ``data``, ``split``, ``classes``, ``tolerance_mm``, ``max_cases``, ``cache_dir``,
    ``threads``, ``label`` (for progress lines), optionally ``part`` (the split's ``"val"`` cases instead).
    Returns ``{"cases": {case_id: {class: metrics}}, "spacing_mm",
    "computed", "reused", "seconds_per_case"}``.
    """
    from cfseg.inference import predict_volume
    from cfseg.module import load_checkpoint

    torch.set_num_threads(job["threads"])
    ckpt, data = Path(job["ckpt"]), Path(job["data"])
    split = Path(job["split"]) if job["split"] else None
    part = job.get("part", "test")
    key = cache_key(ckpt, data, split, job["classes"], job["tolerance_mm"], part)
    cpath = cache_path(ckpt, Path(job["cache_dir"]) if job["cache_dir"] else None, part)
    cache: dict[str, Any] = {"key": key, "cases": {}, "spacing_mm": None}
    if cpath.is_file():
        try:
            old = json.loads(cpath.read_text())
            if old.get("key") == key:
                cache = old
        except (OSError, ValueError):
            pass  # unreadable: recompute
    module = load_checkpoint(str(ckpt)).eval()
    names = module.bank.names
    wanted = set(range(1, len(names))) if not job["classes"] else {module.bank.index(c) for c in job["classes"]}
    transform, items = load_test_cases(module, data, split, job["max_cases"], part)
    todo = [it for it in items if it["case_id"] not in cache["cases"]]
    seconds = []
    for i, item in enumerate(todo):
        vol = transform(item)
        t0 = time.perf_counter()
        labels = predict_volume(module, vol["image"])["labels"]
        seconds.append(time.perf_counter() - t0)
        spacing = voxel_spacing(vol["image"].affine)
        if cache["spacing_mm"] is None:
            cache["spacing_mm"] = list(spacing)
        elif not np.allclose(cache["spacing_mm"], spacing, atol=1e-3):
            raise ValueError(f"{item['case_id']}: network grid spacing {spacing} differs from the other cases' "
                             f"{cache['spacing_mm']}")
        ks = [k for k in torch.nonzero(vol["annotated"]).flatten().tolist() if k in wanted]
        per = case_metrics(labels, vol["label"][0], ks, spacing, job["tolerance_mm"])
        cache["cases"][item["case_id"]] = {names[k]: v for k, v in per.items()}
        cache["cases"][item["case_id"]]["_predict_s"] = round(seconds[-1], 3)
        _write_json(cpath, cache)  # after every case: an interrupted run keeps what it finished
        print(f"[{job['label']}] {item['case_id']} ({i + 1}/{len(todo)} new) {seconds[-1]:.1f} s", flush=True)
    ids = [it["case_id"] for it in items]
    return {"cases": {c: cache["cases"][c] for c in ids}, "spacing_mm": cache["spacing_mm"],
            "computed": len(todo), "reused": len(ids) - len(todo),
            "seconds_per_case": statistics.median(seconds) if seconds else None, "cache": str(cpath)}


# ----------------------------------------------------------------------------------------------------------
# Timing (interleaved between heads, one process)
# ----------------------------------------------------------------------------------------------------------
def _step_setup(m: Any, batch: int, patch: int, seed: int = 0) -> tuple[Any, dict[str, torch.Tensor], Any]:
    """(module, random batch ``[batch, 1, patch^3]`` with every class annotated, AdamW) for a training step."""
    x = torch.randn(batch, 1, patch, patch, patch, generator=torch.Generator().manual_seed(seed))
    n_cls = len(m.bank.names)
    y = torch.randint(0, n_cls, (batch, 1, patch, patch, patch), generator=torch.Generator().manual_seed(seed + 1))
    b = {"image": x, "label": y, "annotated": torch.ones(batch, n_cls, dtype=torch.bool)}
    params = [p for p in m.net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(m.hparams.lr), weight_decay=float(m.hparams.get("weight_decay", 0.01)))
    return m, b, opt


def _train_step(m: Any, b: dict[str, torch.Tensor], opt: Any) -> float:
    """One training step (forward + the head's loss + backward + AdamW step); its seconds."""
    m.train()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    feats, ctx = m.net.encode(b["image"])
    logits = m.net.logits(feats, None, **m.head_context(), **ctx)
    loss = m.loss(logits, b)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def time_training_steps(modules: dict[str, Any], batch: int, patch: int, warmup: int, reps: int,
                        seed: int = 0) -> dict[str, list[float]]:
    """Seconds per training step (forward + the head's loss + backward + AdamW step) of each module on the same
    random batch ``[batch, 1, patch^3]`` (every class annotated), heads interleaved, order reversed every rep."""
    setups = {name: _step_setup(m, batch, patch, seed) for name, m in modules.items()}

    def step(name: str) -> float:
        return _train_step(*setups[name])

    names = list(modules)
    for _ in range(warmup):
        for n in names:
            step(n)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for n in (names if rep % 2 == 0 else names[::-1]):
            times[n].append(step(n))
    for m, _, _ in setups.values():
        m.eval()
    return times


def time_inference(modules: dict[str, Any], transform: Any, items: Sequence[dict[str, Any]],
                   one_class: str) -> dict[str, dict[str, list[float]]]:
    """Seconds of :func:`predict_volume` per case, every class and ``one_class`` only, heads interleaved."""
    from cfseg.inference import predict_volume

    names = list(modules)
    out = {n: {"all": [], "one": []} for n in names}
    for i, item in enumerate(items):
        image = transform(item)["image"]
        for n in (names if i % 2 == 0 else names[::-1]):
            m = modules[n].eval()
            t0 = time.perf_counter()
            predict_volume(m, image, probabilities=False)  # labels, as cfseg-segment computes masks
            out[n]["all"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            predict_volume(m, image, class_indices=[m.bank.index(one_class)], probabilities=False)
            out[n]["one"].append(time.perf_counter() - t0)
        print(f"[timing] inference case {i + 1}/{len(items)}", flush=True)
    return out


# ----------------------------------------------------------------------------------------------------------
# Memory (one fresh process per head and task)
# ----------------------------------------------------------------------------------------------------------
MEMORY_TASKS = ("train_step", "infer_all", "infer_one")
MEMORY_CONVENTION = ("peak resident memory (Linux VmHWM, reset through /proc/self/clear_refs) above the resident "
                     "memory just before the task, in MiB; one fresh process per head and task, the checkpoint and "
                     "the input already loaded; the first run of the task in that process (what a user's first call "
                     "costs, allocator warm-up included)")


def _proc_status_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if m is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(m.group(1))


def peak_memory_supported() -> bool:
    """Whether this OS lets a process reset and read its peak resident memory (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _proc_status_kib("VmHWM")
        return True
    except OSError:
        return False


def peak_memory_mib(fn: Any) -> float:
    """Peak resident memory that ``fn()`` adds above the process's resident memory before it, in MiB."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _proc_status_kib("VmRSS")
    fn()
    return (_proc_status_kib("VmHWM") - before) / 1024.0


def memory_job(job: dict[str, Any]) -> float:
    """Peak memory (MiB) of one task of one checkpoint, run once in this (fresh) process.

    ``job``: ``ckpt``, ``task`` (one of :data:`MEMORY_TASKS`), ``data``, ``split``, ``one_class``, ``step_batch``,
    ``step_patch``, ``threads``.
    """
    from cfseg.inference import predict_volume
    from cfseg.module import load_checkpoint

    torch.set_num_threads(job["threads"])
    m = load_checkpoint(job["ckpt"]).eval()
    if job["task"] == "train_step":
        setup = _step_setup(m, job["step_batch"], job["step_patch"])
        return peak_memory_mib(lambda: _train_step(*setup))
    transform, items = load_test_cases(m, Path(job["data"]), Path(job["split"]) if job["split"] else None, 1)
    image = transform(items[0])["image"]
    cls = None if job["task"] == "infer_all" else [m.bank.index(job["one_class"])]
    with torch.no_grad():
        return peak_memory_mib(lambda: predict_volume(m, image, class_indices=cls, probabilities=False))


def measure_memory(ckpts: dict[str, Path], a: argparse.Namespace,
                   one_class: str) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]:
    """Peak MiB of every task for each head's (first seed's) checkpoint, each run in its own fresh process,
    ``--memory-reps`` times (heads and tasks interleaved). Returns ({head: {task: median}}, {head: {task: runs}})."""
    import multiprocessing as mp

    base = {"data": str(a.data), "split": str(a.split) if a.split else None, "one_class": one_class,
            "step_batch": a.step_batch, "step_patch": a.step_patch, "threads": a.threads}
    keys = [(name, task) for _ in range(a.memory_reps) for name in ckpts for task in MEMORY_TASKS]
    jobs = [{**base, "ckpt": str(ckpts[name]), "task": task} for name, task in keys]
    with ProcessPoolExecutor(max_workers=a.workers, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as ex:
        peaks = list(ex.map(memory_job, jobs))
    raw: dict[str, dict[str, list[float]]] = {name: {t: [] for t in MEMORY_TASKS} for name in ckpts}
    for (name, task), peak in zip(keys, peaks, strict=True):
        raw[name][task].append(round(peak, 1))
    return {n: {t: statistics.median(v) for t, v in r.items()} for n, r in raw.items()}, raw


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


# ----------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------
def _mean(values: Sequence[float | None]) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def _spread(values: Sequence[float]) -> float:
    """Half the range; NaN with fewer than two (non-NaN) values."""
    vals = [v for v in values if not math.isnan(v)]
    return (max(vals) - min(vals)) / 2 if len(vals) > 1 else float("nan")


def summarise_seed(cases: dict[str, dict[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """Per-class means over cases of one checkpoint (each case only on its annotated classes)."""
    per: dict[str, dict[str, list]] = {c: {"dice": [], "hd95_mm": [], "surface_dice": []} for c in classes}
    counts = {c: {"scored": 0, "empty_prediction": 0, "empty_ground_truth": 0, "both_empty": 0} for c in classes}
    for case in cases.values():
        for c in classes:
            m = case.get(c)
            if m is None:
                continue  # not annotated in this case
            per[c]["dice"].append(m["dice"])
            per[c]["surface_dice"].append(m["surface_dice"])
            if m["hd95_mm"] is not None:
                per[c]["hd95_mm"].append(m["hd95_mm"])
            n = counts[c]
            n["scored"] += 1
            n["both_empty"] += int(m["pred_voxels"] == 0 and m["gt_voxels"] == 0)
            n["empty_prediction"] += int(m["pred_voxels"] == 0 and m["gt_voxels"] > 0)
            n["empty_ground_truth"] += int(m["gt_voxels"] == 0 and m["pred_voxels"] > 0)
    out: dict[str, Any] = {"n_cases": len(cases)}
    for metric in ("dice", "hd95_mm", "surface_dice"):
        pc = {c: _mean(per[c][metric]) for c in classes}
        out[f"per_class_{metric}" if metric != "dice" else "per_class"] = pc
        out[f"mean_{metric}"] = _mean(list(pc.values()))
    out["counts"] = counts
    return out


def summarise_head(seeds: dict[str, dict[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """Mean over seeds and spread (half the range) of each per-seed quantity."""
    def agg(key: str) -> tuple[float, float]:
        vals = [s[key] for s in seeds.values()]
        return _mean(vals), _spread(vals)

    def agg_class(key: str) -> tuple[dict[str, float], dict[str, float]]:
        return ({c: _mean([s[key][c] for s in seeds.values()]) for c in classes},
                {c: _spread([s[key][c] for s in seeds.values()]) for c in classes})

    mean_dice, dice_spread = agg("mean_dice")
    per_class, per_class_spread = agg_class("per_class")
    hd_mean, hd_spread = agg("mean_hd95_mm")
    hd_pc, hd_pc_spread = agg_class("per_class_hd95_mm")
    nsd_mean, nsd_spread = agg("mean_surface_dice")
    nsd_pc, nsd_pc_spread = agg_class("per_class_surface_dice")
    excluded = {c: {k: sum(s["counts"][c][k] for s in seeds.values())
                    for k in ("scored", "empty_prediction", "empty_ground_truth", "both_empty")} for c in classes}
    return {
        "mean_dice": mean_dice, "mean_dice_spread": dice_spread,
        "per_class": per_class, "per_class_spread": per_class_spread,
        "hd95_mm": {"mean": hd_mean, "spread": hd_spread, "per_class": hd_pc, "per_class_spread": hd_pc_spread,
                    "excluded": excluded},
        "surface_dice": {"mean": nsd_mean, "spread": nsd_spread, "per_class": nsd_pc,
                         "per_class_spread": nsd_pc_spread},
    }


def _clean(obj: Any) -> Any:
    """NaN / inf -> None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------
def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _pm(v: float | None, spread: float | None, digits: int = 3) -> str:
    """``v ± spread``; ``v`` alone when the spread is undefined (one seed), ``n/a`` when ``v`` is."""
    if _f(v) == "n/a":
        return "n/a"
    return _f(v, digits) if _f(spread) == "n/a" else f"{_f(v, digits)} ± {_f(spread, digits)}"


def _memory_cell(peaks: dict[str, float] | None) -> str:
    return "n/a" if not peaks else " / ".join(f"{peaks[t]:,.0f}" for t in MEMORY_TASKS)


def markdown(report: dict[str, Any]) -> str:
    heads, meta = report["heads"], report["meta"]
    names = list(heads)
    classes = meta["classes"]
    tol = meta["tolerance_mm"]
    lines = [f"# {meta['title']}", "",
             f"{report['n_test_cases']} test cases, seeds per head: "
             + ", ".join(f"{n} ({', '.join(heads[n]['per_seed'])})" for n in names) + ". "
             f"Mean over seeds ± {SPREAD}.", "",
             "| head | output | mean Dice | per seed | HD95 (mm) | surface Dice "
             f"@{tol:g} mm | params | head params | train step (s) | inference / case, all classes (s) "
             "| one class (s) | peak MiB: train step / all classes / one class | can add a class later |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for n in names:
        h = heads[n]
        seeds = ", ".join(_f(s["mean_dice"]) for s in h["per_seed"].values())
        lines.append(
            f"| {n} | {h['output']} | {_pm(h['mean_dice'], h['mean_dice_spread'])} | {seeds} "
            f"| {_pm(h['hd95_mm']['mean'], h['hd95_mm']['spread'], 1)} "
            f"| {_pm(h['surface_dice']['mean'], h['surface_dice']['spread'])} "
            f"| {h['params']:,} | {h['head_params']:,} | {_f(h['step_s'], 2)} | {_f(h['infer_s'], 1)} "
            f"| {_f(h['infer_one_class_s'], 1)} | {_memory_cell(h.get('peak_memory_mib'))} | {h['can_add_class']} |")
    for title, key, digits in (("Dice per class (mean ± spread over seeds)", None, 3),
                               ("HD95 per class, mm (cases with an empty prediction or ground truth excluded: "
                                "count in brackets)", "hd95_mm", 1),
                               (f"Surface Dice per class at {tol:g} mm", "surface_dice", 3)):
        lines += ["", f"### {title}", "", "| class | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for c in classes:
            cells = []
            for n in names:
                src = heads[n] if key is None else heads[n][key]
                cell = _pm(src["per_class"][c], src["per_class_spread"][c], digits)
                if key == "hd95_mm":
                    ex = src["excluded"][c]
                    cell += f" [{ex['empty_prediction'] + ex['empty_ground_truth']}/{ex['scored']}]"
                cells.append(cell)
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        if key is None:
            lines.append("| **mean** | " + " | ".join(
                f"**{_pm(heads[n]['mean_dice'], heads[n]['mean_dice_spread'])}**" for n in names) + " |")
    t = meta["timing"]
    lines += ["", "### Conventions and setup", "",
              f"- Dice: {report['dice_convention']}.",
              f"- {HD95_CONVENTION}; the HD95 mean over classes covers only the classes with at least one scored case, "
              "so a head that never predicts a class is not penalised there (see its count and its Dice).",
              f"- {NSD_CONVENTION.format(tol=tol)}.",
              f"- Network grid spacing: {' x '.join(f'{s:g}' for s in meta['spacing_mm'])} mm (array axes, from the "
              "preprocessed volume's affine); metrics are computed on that grid, not in the original geometry.",
              "- Parameters: module.net (backbone + head) and module.net.head; buffers (prototype bank, text "
              "embeddings) not counted.",
              f"- Training step: forward + the head's loss + backward + AdamW, batch {t['step_batch']} x 1 x "
              f"{t['step_patch']}^3 random, every class annotated, median of {t['step_reps']} after {t['step_warmup']} "
              "warm-up, heads interleaved.",
              f"- Inference: predict_volume on {t['time_cases']} test case(s), every class / one class "
              f"({t['one_class']}), median, heads interleaved (the first seed's checkpoint of each head).",
              f"- Peak memory: {t.get('memory') or 'not measured'}.",
              f"- Machine: {meta['machine']}; torch threads {t['threads']}; load average at the start of timing "
              f"{t['load_average']}.",
              f"- Command: `{report['command']}` ({meta['date']})."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads, classes = report["heads"], report["meta"]["classes"]
    names = list(heads)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(15, 4.5), gridspec_kw={"width_ratios": [1, 3]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, n in enumerate(names):
        h, col = heads[n], colors[i % len(colors)]
        ax0.bar(i, h["mean_dice"] or 0.0, 0.6, color=col, alpha=0.8)
        seeds = [s["mean_dice"] for s in h["per_seed"].values()]
        ax0.plot([i] * len(seeds), seeds, "o", color="k", ms=4)
    ax0.set_xticks(range(len(names)), names, rotation=20)
    ax0.set_ylim(0, 1)
    ax0.set_ylabel("mean Dice over classes (test)")
    ax0.set_title("mean Dice (bars: mean of seeds; dots: seeds)")
    x = np.arange(len(classes))
    w = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        h, col = heads[n], colors[i % len(colors)]
        ax1.bar(x + i * w, [h["per_class"][c] or 0.0 for c in classes], w, label=n, color=col, alpha=0.8)
        for s in h["per_seed"].values():
            ax1.plot(x + i * w, [s["per_class"][c] if s["per_class"][c] is not None else np.nan for c in classes],
                     "o", color="k", ms=2.5)
    ax1.set_xticks(x + w * (len(names) - 1) / 2, classes, rotation=20)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("Dice (annotated test cases)")
    ax1.legend(fontsize=8)
    ax1.set_title(report["meta"]["title"])
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------
def _checkpoints(a: argparse.Namespace) -> list[tuple[str, str, Path]]:
    specs = [parse_ckpt(s) for s in a.ckpt or []]
    if a.results is not None:
        if not a.heads:
            raise SystemExit("--results needs --heads (and --seeds)")
        for h in a.heads:
            for s in a.seeds:
                specs.append((h, str(s), Path(CHECKPOINT_LAYOUT.format(results=a.results, head=h, seed=s))))
    if not specs:
        raise SystemExit("give checkpoints: --ckpt name:seed=path (repeat) or --results DIR --heads ... --seeds ...")
    missing = [str(p) for _, _, p in specs if not p.is_file()]
    if missing and not a.skip_missing:
        raise SystemExit("checkpoints not found (pass --skip-missing to report without them):\n  "
                         + "\n  ".join(missing))
    for m in missing:
        print(f"skipping missing checkpoint {m}", file=sys.stderr)
    seen = set()
    for name, seed, _ in specs:
        if (name, seed) in seen:
            raise SystemExit(f"{name}:{seed} given twice")
        seen.add((name, seed))
    return [s for s in specs if s[2].is_file()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", help="name:seed=path (repeat)")
    p.add_argument("--results", type=Path, help=f"or: checkpoints at {CHECKPOINT_LAYOUT} for --heads x --seeds")
    p.add_argument("--heads", nargs="+", default=[])
    p.add_argument("--seeds", nargs="+", default=["0", "1"])
    p.add_argument("--skip-missing", action="store_true", help="report the checkpoints that exist, skip the others")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--split", type=Path, default=SPLIT, help="split file with the 'test' case ids")
    p.add_argument("--classes", nargs="+", default=None, help="score only these (default: every class)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "openkbp")
    p.add_argument("--prefix", default="heads", help="output file names: <out>/<prefix>.{json,md,png}")
    p.add_argument("--title", default="OpenKBP organs at risk: heads side by side (joint training)")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="surface Dice tolerance")
    p.add_argument("--max-cases", type=int, default=None, help="score only the first N test cases (quick check)")
    p.add_argument("--workers", type=int, default=1, help="checkpoints scored in parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (scoring and timing)")
    p.add_argument("--cache-dir", type=Path, default=None, help="per-checkpoint caches here instead of beside them")
    p.add_argument("--time-cases", type=int, default=3, help="test cases for the inference timing (0: skip timing)")
    p.add_argument("--step-reps", type=int, default=5)
    p.add_argument("--step-warmup", type=int, default=2)
    p.add_argument("--step-batch", type=int, default=2)
    p.add_argument("--step-patch", type=int, default=64)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--memory-reps", type=int, default=3, help="fresh processes per head and task (median)")
    a = p.parse_args(argv)
    if a.workers < 1 or a.threads < 1 or a.memory_reps < 1 or a.time_cases < 0 or a.step_reps < 0 or a.step_warmup < 0:
        p.error("--workers, --threads and --memory-reps must be >= 1, --time-cases/--step-reps/--step-warmup >= 0")
    command = "python benchmarks/openkbp/heads.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(a.threads)
    specs = _checkpoints(a)
    if a.cache_dir is not None:
        a.cache_dir.mkdir(parents=True, exist_ok=True)

    # ---- scoring (cached, optionally parallel) -------------------------------------------------------
    jobs = [{"ckpt": str(path), "data": str(a.data), "split": str(a.split) if a.split else None,
             "classes": a.classes, "tolerance_mm": a.tolerance_mm, "max_cases": a.max_cases,
             "cache_dir": str(a.cache_dir) if a.cache_dir else None, "threads": a.threads,
             "label": f"{name}:{seed}"} for name, seed, path in specs]
    t0 = time.time()
    if a.workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=min(a.workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
            scored = list(ex.map(score_checkpoint, jobs))
    else:
        scored = [score_checkpoint(j) for j in jobs]
    scoring_s = time.time() - t0
    for (name, seed, _), s in zip(specs, scored, strict=True):
        print(f"{name}:{seed}: {s['computed']} cases computed, {s['reused']} from {s['cache']}"
              + (f", {s['seconds_per_case']:.1f} s per case" if s["seconds_per_case"] else ""), flush=True)
    case_sets = {tuple(sorted(s["cases"])) for s in scored}
    if len(case_sets) > 1:
        raise SystemExit("the checkpoints were scored on different test cases (different vocabularies or data?)")
    test_cases = sorted(scored[0]["cases"])

    # ---- per-head info, aggregation -------------------------------------------------------------------
    from cfseg.metrics import DICE_CONVENTION
    from cfseg.module import load_checkpoint

    by_head: dict[str, dict[str, Any]] = {}
    for (name, seed, path), s in zip(specs, scored, strict=True):
        by_head.setdefault(name, {})[seed] = (path, s)
    first_module = {}
    heads: dict[str, Any] = {}
    classes: list[str] | None = None
    for name, seeds in by_head.items():
        infos = {}
        for seed, (path, _) in seeds.items():
            m = load_checkpoint(str(path)).eval()
            infos[seed] = model_info(m)
            first_module.setdefault(name, m)
        info = next(iter(infos.values()))
        if any((i["head_class"], i["params"]) != (info["head_class"], info["params"]) for i in infos.values()):
            raise SystemExit(f"{name}: the seeds' checkpoints hold different heads or networks: {infos}")
        cls = a.classes or info["classes"]
        if classes is None:
            classes = list(cls)
        elif list(cls) != classes:
            raise SystemExit(f"{name}: classes {cls} differ from the other heads' {classes}")
        per_seed = {seed: summarise_seed(s["cases"], classes) for seed, (_, s) in seeds.items()}
        heads[name] = {**summarise_head(per_seed, classes), "per_seed": {
            seed: {"mean_dice": v["mean_dice"], "per_class": v["per_class"],
                   "hd95_mm": {"mean": v["mean_hd95_mm"], "per_class": v["per_class_hd95_mm"]},
                   "surface_dice": {"mean": v["mean_surface_dice"], "per_class": v["per_class_surface_dice"]},
                   "counts": v["counts"], "n_cases": v["n_cases"], "checkpoint": str(seeds[seed][0]),
                   "seconds_per_case_scoring": seeds[seed][1]["seconds_per_case"]}
            for seed, v in per_seed.items()},
            **{k: info[k] for k in ("head_class", "output", "open_vocabulary", "params", "head_params",
                                    "can_add_class")}}
    spacing = scored[0]["spacing_mm"]

    # ---- timing (one process, heads interleaved) ------------------------------------------------------
    timing = {"threads": torch.get_num_threads(), "step_batch": a.step_batch, "step_patch": a.step_patch,
              "step_reps": a.step_reps, "step_warmup": a.step_warmup, "time_cases": a.time_cases,
              "one_class": classes[0], "load_average": ", ".join(f"{v:.1f}" for v in os.getloadavg())}
    step_times = time_training_steps(first_module, a.step_batch, a.step_patch, a.step_warmup, a.step_reps) \
        if a.step_reps else {}
    infer = {}
    if a.time_cases:
        m0 = next(iter(first_module.values()))
        transform, items = load_test_cases(m0, a.data, a.split, a.time_cases)
        infer = time_inference(first_module, transform, items, classes[0])
    memory: dict[str, dict[str, float]] = {}
    memory_raw: dict[str, dict[str, list[float]]] = {}
    if not a.no_memory:
        if peak_memory_supported():
            memory, memory_raw = measure_memory({n: next(iter(seeds.values()))[0] for n, seeds in by_head.items()},
                                                a, classes[0])
        else:
            print("peak memory not measured: this OS cannot reset a process's peak resident memory "
                  "(/proc/self/clear_refs, Linux >= 4.0)", file=sys.stderr)
    timing["memory"] = f"{MEMORY_CONVENTION}; median of {a.memory_reps} such processes" if memory else None
    for name in heads:
        heads[name]["peak_memory_mib"] = memory.get(name)
        heads[name]["step_s"] = statistics.median(step_times[name]) if step_times else None
        heads[name]["infer_s"] = statistics.median(infer[name]["all"]) if infer else None
        heads[name]["infer_one_class_s"] = statistics.median(infer[name]["one"]) if infer else None
        heads[name]["timing_raw_s"] = {"step": step_times.get(name, []), **infer.get(name, {})}
        heads[name]["peak_memory_raw_mib"] = memory_raw.get(name)

    report = {
        "heads": heads,
        "test_cases": test_cases,
        "n_test_cases": len(test_cases),
        "dice_convention": DICE_CONVENTION,
        "hd95_convention": HD95_CONVENTION,
        "surface_dice_convention": NSD_CONVENTION.format(tol=a.tolerance_mm),
        "spread": SPREAD,
        "command": command,
        "meta": {"title": a.title, "classes": classes, "tolerance_mm": a.tolerance_mm, "spacing_mm": spacing,
                 "machine": machine(), "date": time.strftime("%Y-%m-%d"), "timing": timing,
                 "scoring_wall_s": round(scoring_s, 1), "workers": a.workers, "data": str(a.data),
                 "split": str(a.split) if a.split else None},
    }
    report = _clean(report)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.prefix}.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    md = markdown(report)
    (a.out / f"{a.prefix}.md").write_text(md)
    plot(report, a.out / f"{a.prefix}.png")
    print(md)
    return report


if __name__ == "__main__":
    main()
