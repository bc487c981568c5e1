"""Peak resident memory and wall time of ``cfseg-segment`` on large CT volumes (issue 37, item 9).

The largest input accepted by default (:data:`cfseg.geometry.DEFAULT_MAX_VOXELS`, 512 x 512 x 1024) should segment
within 4 GB of resident memory on the CPU. This script measures it:

* a synthetic int16 CT per size (default 512 x 512 x 1024 at 0.8 x 0.8 x 0.5 mm: an elliptic body at 40 HU in air
  at -1000 HU, a 300 HU block inside), written as ``.nii.gz`` into a temporary folder;
* a small checkpoint trained offline on the synthetic ``tiny`` phantoms (:func:`cfseg.data.synthetic.make_datasets`)
  with ``tests/configs/tiny.yaml`` at 4 x 4 x 3 mm, patch 32^3, 2 steps (``--ckpt`` reuses one instead): quality
  does not matter, the grids do (the network grid does not align with the input grid, so the class probabilities
  are resampled back, the costly path);
* one ``cfseg-segment --multilabel`` process per size (``python -m cfseg.apps.segment``; ``--masks`` writes one
  mask per class instead), its peak RSS from ``os.wait4`` (``ru_maxrss`` of that process alone) and its wall time.

``--src DIR`` runs another copy of the ``cfseg`` package (``DIR/cfseg``, e.g. ``git archive <commit> cfseg``) to
measure an older version the same way. Results go to ``reports/data/memory/large_volume.json`` (``--out``).

Example::

    CFSEG_CACHE_DIR=/tmp/cfseg-cache .venv/bin/python benchmarks/large_volume_memory.py
    .venv/bin/python benchmarks/large_volume_memory.py --sizes 512x512x256 --src /tmp/cfseg-old --out old.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPACING = (0.8, 0.8, 0.5)
#: peak resident memory the largest accepted input should stay within (issue 37, item 9)
TARGET_GB = 4.0


def make_ct(path: Path, shape: tuple[int, int, int], spacing=SPACING) -> Path:
    """A synthetic int16 CT of ``shape``: an elliptic body at 40 HU in air, a 300 HU block, no noise (fast)."""
    import nibabel as nib

    nx, ny, nz = shape
    x = np.linspace(-1, 1, nx, dtype=np.float32)[:, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :]
    body = np.where(x**2 + 1.4 * y**2 < 0.8, 40, -1000).astype(np.int16)
    vol = np.empty(shape, np.int16, order="F")
    vol[...] = body[:, :, None]
    cx, cy, cz = nx * 2 // 5, ny * 2 // 5, nz * 2 // 5
    vol[cx:cx + nx // 8, cy:cy + ny // 8, cz:cz + nz // 5] = 300
    affine = np.diag([*spacing, 1.0])
    img = nib.Nifti1Image(vol, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def train_checkpoint(work: Path) -> Path:
    """A tiny checkpoint at 4 x 4 x 3 mm, 2 steps on the synthetic phantoms (offline, a minute or less)."""
    from cfseg.data.synthetic import make_datasets

    roots = make_datasets(work / "phantoms", "tiny", seed=0)
    datasets = [{"path": str(p), "val_fraction": 0.25, "test_fraction": 0.0} for p in roots]
    cmd = [sys.executable, "-m", "cfseg.apps.cli", "fit", "--config", str(ROOT / "tests" / "configs" / "tiny.yaml"),
           f"--data.datasets={json.dumps(datasets)}", f"--trainer.logger.init_args.save_dir={work / 'run'}",
           f"--trainer.default_root_dir={work / 'run'}", "--data.spacing=[4.0, 4.0, 3.0]",
           "--data.patch_size=[32, 32, 32]", "--trainer.max_steps=2"]
    subprocess.run(cmd, check=True, cwd=work, stdout=subprocess.DEVNULL)
    found = sorted((work / "run").rglob("*.ckpt"))
    if not found:
        raise SystemExit("training wrote no checkpoint")
    return found[-1]


def measure(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; its exit code, wall time (s) and peak RSS (GB, ``ru_maxrss`` of this child alone, by
    ``os.wait4``)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        tails = out.read().strip().splitlines()[-3:], err.read().strip().splitlines()[-3:]
    return {"exit_code": proc.returncode, "wall_s": round(wall, 1),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3), "stdout_tail": tails[0], "stderr_tail": tails[1]}


def run_segment(image: Path, ckpt: Path, out: Path, masks: bool, env: dict[str, str]) -> dict:
    code = "import sys; from cfseg.apps.segment import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "-i", str(image), "-o", str(out), "--ckpt", str(ckpt)]
    if not masks:
        cmd.append("--multilabel")
    return measure(cmd, env)


def _check_output(out: Path, shape: tuple[int, int, int]) -> dict:
    import nibabel as nib

    files = sorted(p for p in out.glob("*.nii.gz"))
    shapes = {p.name: tuple(int(s) for s in nib.load(str(p)).shape) for p in files}
    return {"files": len(files), "shapes_match": all(s == shape for s in shapes.values()) and bool(files)}


def _version(src: Path | None) -> dict:
    where = src or ROOT
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "cfseg"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {"cfseg_source": str(where / "cfseg"), "commit": commit if src is None else None,
            "uncommitted_changes_in_cfseg": dirty if src is None else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["512x512x1024"], help="CT shapes, e.g. 512x512x256 512x512x1024")
    p.add_argument("--ckpt", type=Path, default=None, help="reuse this checkpoint (default: train a tiny one)")
    p.add_argument("--src", type=Path, default=None, help="folder holding another cfseg package to measure")
    p.add_argument("--masks", action="store_true", help="one mask per class instead of --multilabel")
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "data" / "memory" / "large_volume.json")
    p.add_argument("--note", default=None, help="recorded in the report (e.g. which commit --src holds)")
    a = p.parse_args(argv)
    env = dict(os.environ)
    env.setdefault("CFSEG_CACHE_DIR", str(Path(tempfile.gettempdir()) / "cfseg-cache-bench"))
    if a.src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(a.src.resolve()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="cfseg-mem-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ckpt = a.ckpt or train_checkpoint(work)
        train_s = None if a.ckpt else round(time.perf_counter() - t0, 1)
        rows = []
        for size in a.sizes:
            shape = tuple(int(s) for s in size.lower().split("x"))
            image = make_ct(work / f"ct_{size}.nii.gz", shape)  # type: ignore[arg-type]
            out = work / f"out_{size}"
            r = run_segment(image, ckpt, out, a.masks, env)
            r = {"shape": list(shape), "voxels": int(np.prod(shape)), "spacing_mm": list(SPACING),
                 "input_bytes_int16": int(np.prod(shape)) * 2, **r, **_check_output(out, shape)}  # type: ignore
            r["within_target"] = r["exit_code"] == 0 and r["peak_rss_gb"] <= TARGET_GB
            rows.append(r)
            print(f"{size}: exit {r['exit_code']}, peak RSS {r['peak_rss_gb']:.2f} GB, {r['wall_s']:.0f} s",
                  flush=True)
            image.unlink()
    report = {
        "what": "peak resident memory (ru_maxrss of the cfseg-segment process) and wall time, one process per size",
        "command": "cfseg-segment -i <ct> -o <out> --ckpt <tiny ckpt, 4x4x3 mm>" + ("" if a.masks else " --multilabel"),
        "target_gb": TARGET_GB,
        "checkpoint": "given" if a.ckpt else "tests/configs/tiny.yaml, spacing 4x4x3 mm, patch 32^3, 2 steps",
        "train_s": train_s,
        **_version(a.src),
        "note": a.note,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "results": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
