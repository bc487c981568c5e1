"""Do the prototype head's inference shortcuts keep the labels? Measured on real CT (issue 14, item 7).

The per-voxel argmax of the cosine logits ``(P W z)_k / (||W z|| tau)`` is that of the unnormalised scores
``(P W z)_k / tau`` (``||W z||`` is a positive per-voxel factor), and dropping the norm would make the head as cheap
as a softmax head's ``1x1x1`` convolution. But sliding windows blend the scores of overlapping windows before the
argmax, and there each window's scores would be weighted by its own ``||W z||``. This script runs the exact path
(``predict_volume``) and the shortcut (the same with ``cfseg.cosine._cosine_head`` swapped for the unnormalised
product) on the test cases of a trained checkpoint and reports the fraction of voxels whose label differs and the
per-class Dice change::

    python benchmarks/unnormalised_labels.py --ckpt results/heads/prototype_s0/logs/version_0/checkpoints/joint.ckpt \\
        --max-cases 10 --out benchmarks/unnormalised_labels.json

``--variant folded`` compares instead the unfolded head with the normalisation folded into the backbone's output
layer (:mod:`cfseg.folding`, what ``predict_volume`` runs): the same maths, only the rounding differs::

    python benchmarks/unnormalised_labels.py --variant folded --ckpt <same> --max-cases 10 \\
        --out benchmarks/folded_labels.json

The reference ("full") path always runs the unfolded head (:func:`cfseg.folding.folded_predictor` disabled).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "openkbp"))


def _unnormalised(z: torch.Tensor, a: torch.Tensor, gram: torch.Tensor, eps: float) -> torch.Tensor:
    """``A z`` ``[B, K+1, N]``: the cosine head without the per-voxel ``1 / ||W z||`` (the shortcut measured)."""
    return torch.bmm(a.to(z.dtype).expand(z.shape[0], *a.shape), z)


@contextlib.contextmanager
def _patched(target: object, name: str, value: object) -> Iterator[None]:
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--variant", choices=("unnormalised", "folded"), default="unnormalised",
                   help="the shortcut compared with the unfolded, normalised head")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "openkbp_oar"))
    p.add_argument("--split", default=str(ROOT / "configs" / "openkbp" / "split_joint.json"))
    p.add_argument("--max-cases", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the summary as JSON here")
    a = p.parse_args(argv)
    from heads import load_test_cases

    import cfseg.module as cfseg_module
    from cfseg import cosine
    from cfseg.inference import predict_volume
    from cfseg.metrics import dice_per_class
    from cfseg.module import load_checkpoint

    if not Path(a.data).is_dir():
        print(f"SKIP: {a.data} not found (the OpenKBP data of ../shared/data)")
        return 0
    torch.set_num_threads(a.threads)
    module = load_checkpoint(a.ckpt).eval()
    transform, items = load_test_cases(module, Path(a.data), Path(a.split), a.max_cases)
    names = module.bank.names
    rows = []
    for item in items:
        vol = transform(item)
        ks = [k for k in torch.nonzero(vol["annotated"]).flatten().tolist() if k > 0]
        with _patched(cfseg_module, "folded_predictor", lambda *_a, **_k: None):
            full = predict_volume(module, vol["image"], probabilities=False)["labels"].long()
            if a.variant == "unnormalised":
                with _patched(cosine, "_cosine_head", _unnormalised):
                    fast = predict_volume(module, vol["image"], probabilities=False)["labels"].long()
        if a.variant == "folded":
            fast = predict_volume(module, vol["image"], probabilities=False)["labels"].long()
        target = vol["label"][0].long()
        rows.append({"case": item["case_id"], "voxels": full.numel(), "differ": int((full != fast).sum()),
                     "dice_full": dict(zip([names[k] for k in ks], dice_per_class(full, target, ks).tolist(),
                                           strict=True)),
                     f"dice_{a.variant}": dict(zip([names[k] for k in ks], dice_per_class(fast, target, ks).tolist(),
                                                  strict=True))})
        print(f"{item['case_id']}: {rows[-1]['differ']} of {rows[-1]['voxels']} voxels differ", flush=True)
    differ, voxels = sum(r["differ"] for r in rows), sum(r["voxels"] for r in rows)
    gaps = [abs(r["dice_full"][c] - r[f"dice_{a.variant}"][c]) for r in rows for c in r["dice_full"]]
    summary = {"checkpoint": a.ckpt, "variant": a.variant, "cases": len(rows), "voxel_disagreement": differ / voxels,
               "max_abs_dice_change": max(gaps), "mean_abs_dice_change": sum(gaps) / len(gaps), "per_case": rows}
    print(f"{len(rows)} cases: {differ} of {voxels} voxels differ ({differ / voxels:.2e}); |Dice change| mean "
          f"{summary['mean_abs_dice_change']:.2e}, max {summary['max_abs_dice_change']:.2e}")
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
