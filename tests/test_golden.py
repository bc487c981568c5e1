"""Golden fingerprints: short seeded fits of every continual strategy and a ``cfseg-segment`` output, bit-identical
to the values recorded in ``tests/golden/fingerprints.json``.

They pin behaviour across refactorings: a change that alters what a strategy trains or what ``cfseg-segment``
writes changes a hash. Re-record only for a change of behaviour that is meant (say so in the commit):

    .venv/bin/python tests/test_golden.py --record tests/golden/fingerprints.json
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from cfseg.text.cache import clear_memory_cache

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden" / "fingerprints.json"
CONFIG = HERE / "configs" / "tiny.yaml"
FAST = {"data": {"spacing": [4.0, 4.0, 4.0]}, "trainer": {"limit_val_batches": 1.0}}
#: every strategy of the protocol; distill with pseudo-labels, feature distillation and Local POD switched on
ROWS: list[Any] = [
    "finetune",
    {"name": "distill", "strategy": {"class_path": "cfseg.continual.Distill",
                                     "init_args": {"pseudo_label": True, "pod_weight": 1.0, "feat_weight": 0.5}}},
    "experts", "ewc", "replay", "joint",
]


def _digest(obj: Any, h: Any, root: str) -> None:
    """Feed a canonical form of ``obj`` (nested dicts, lists, tensors, numbers, strings) into hash ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _digest(obj[k], h, root)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _digest(v, h, root)
        h.update(b"]")
    else:
        h.update(repr(obj).replace(root, "<tmp>").encode())


def digest(obj: Any, root: str = "\0") -> str:
    h = hashlib.sha256()
    _digest(obj, h, root)
    return h.hexdigest()[:16]


def checkpoint_fingerprint(path: Path, root: str) -> dict[str, str]:
    """Hashes of a checkpoint's weights and of the metadata later stages read (bank, experts, Fisher)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt["cfseg"]
    return {"state_dict": digest(ckpt["state_dict"]), "bank": digest(meta["prototype_bank"]),
            "experts": digest(meta.get("experts"), root), "ewc_fisher": digest(meta.get("ewc_fisher"))}


def record(tmp: Path) -> dict[str, Any]:
    """Run the golden protocol and segmentations under ``tmp``; return every fingerprint."""
    from conftest import make_boxes

    from cfseg.apps.protocol import run_protocol
    from cfseg.apps.segment import main as segment
    from cfseg.experiments.protocol import load_protocol

    threads, cache = torch.get_num_threads(), os.environ.get("CFSEG_CACHE_DIR")
    torch.set_num_threads(1)
    # text embeddings computed here, at one thread: another test's cached ones (other threads) differ in the last bits
    os.environ["CFSEG_CACHE_DIR"] = str(tmp / "text_cache")
    clear_memory_cache()
    try:
        boxes = make_boxes(tmp / "Dataset050_boxes")

        def box(classes=None):
            return {"path": str(boxes), "val_fraction": 0.0, "test_fraction": 0.34, "classes": classes}

        spec = {"base_config": str(CONFIG), "output": str(tmp / "out"), "strategies": ROWS, "max_steps": 3,
                "lr": 0.01, "config": FAST,
                "stages": [{"name": "s0", "datasets": [box(["liver", "spleen"])]},
                           {"name": "s1", "classes": ["aorta"], "datasets": [box()], "unlabeled": [box()]}]}
        path = tmp / "protocol.yaml"
        path.write_text(yaml.safe_dump(spec))
        results = run_protocol(load_protocol(path))[0]
        runs = tmp / "out" / "seed0" / "runs"
        out: dict[str, Any] = {"matrices": {s: r["R"] for s, r in sorted(results.items())}, "checkpoints": {}}
        for ckpt in sorted(runs.glob("*/final.ckpt")):
            out["checkpoints"][ckpt.parent.name] = checkpoint_fingerprint(ckpt, str(tmp))
        image = sorted((boxes / "imagesTr").glob("*.nii.gz"))[0]
        out["segment"] = {}
        for run, extra in (("distill_stage1", ["--similarity"]), ("experts_stage1", [])):
            dst = tmp / "seg" / run
            assert segment(["-i", str(image), "-o", str(dst), "--ckpt", str(runs / run / "final.ckpt"),
                            "--multilabel", "--modality", "ct", *extra]) == 0
            import nibabel as nib

            files = {}
            for f in sorted(dst.glob("*.nii.gz")):
                img = nib.load(str(f))
                files[f.name] = digest([torch.from_numpy(np.asarray(img.dataobj)), torch.from_numpy(img.affine)])
            files["labels.json"] = (dst / "labels.json").read_text()
            out["segment"][run] = files
        return out
    finally:
        torch.set_num_threads(threads)
        clear_memory_cache()
        if cache is None:
            os.environ.pop("CFSEG_CACHE_DIR", None)
        else:
            os.environ["CFSEG_CACHE_DIR"] = cache


def test_strategies_and_segmentation_match_the_golden_fingerprints(tmp_path):
    """Every strategy's short seeded fit and two ``cfseg-segment`` outputs are bit-identical to the recording."""
    if not GOLDEN.is_file():
        pytest.fail(f"{GOLDEN} is missing: record it (see this module's docstring)")
    expected = json.loads(GOLDEN.read_text())
    got = json.loads(json.dumps(record(tmp_path)))
    for key in ("matrices", "checkpoints", "segment"):
        assert got[key] == expected[key], f"{key} changed:\n{json.dumps(got[key], indent=1)}"


if __name__ == "__main__":  # python tests/test_golden.py --record tests/golden/fingerprints.json
    import tempfile

    sys.path.insert(0, str(HERE))
    if len(sys.argv) != 3 or sys.argv[1] != "--record":
        raise SystemExit(__doc__)
    with tempfile.TemporaryDirectory() as d:
        fp = record(Path(d))
    Path(sys.argv[2]).parent.mkdir(parents=True, exist_ok=True)
    Path(sys.argv[2]).write_text(json.dumps(fp, indent=1) + "\n")
    print(json.dumps(fp, indent=1))
