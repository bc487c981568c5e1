"""Whole-volume prediction with a trained module: preprocessing from the checkpoint, sliding windows, argmax
over background plus any requested subset of classes in one forward pass, similarity maps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cfseg.data.transforms import Preprocessing, build_transforms
from cfseg.module import CFSegModule
from cfseg.nets import PrototypeSegmenter


def preprocessing_for(module: CFSegModule, modality: str | None) -> Preprocessing:
    """The checkpoint's preprocessing for ``modality`` (or its only one when None)."""
    pre = module.preprocessing or {}
    if not pre:
        raise ValueError("the checkpoint records no preprocessing; it was not trained with a cfseg data module")
    if modality is None:
        if len(pre) > 1:
            raise ValueError(f"the checkpoint knows several modalities {sorted(pre)}; say which (modality=...)")
        modality = next(iter(pre))
    if modality not in pre:
        raise ValueError(f"the checkpoint was trained on {sorted(pre)}, not {modality!r}")
    return Preprocessing.from_dict(pre[modality])


def load_case(path: str, pre: Preprocessing, label: str | None = None, label_lut=None) -> dict[str, Any]:
    """Load and preprocess one image (and optionally its label) exactly as validation does."""
    item: dict[str, Any] = {"image": path}
    if label is not None:
        item["label"], item["label_lut"] = label, label_lut
    return build_transforms(pre, train=False, labeled=label is not None)(item)


@torch.no_grad()
def predict_volume(
    module: CFSegModule,
    image: torch.Tensor,
    class_indices: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    similarity: bool = False,
) -> dict[str, torch.Tensor]:
    """Segment one preprocessed volume.

    Args:
        module: trained module (eval mode).
        image: [C, *S] preprocessed image.
        class_indices: global indices of the classes to segment (background always included); None = all.
        device: where the network runs; windows are stitched on the CPU.
        similarity: also return cosine similarity maps (prototype head only).

    Returns:
        ``labels``: uint8 [*S] in *global* class indices; ``probs``: float [K'+1, *S] softmax over the
        requested classes; ``similarity``: float [K'+1, *S] when asked.
    """
    module = module.to(device).eval()
    idx = list(range(1, len(module.bank.names))) if class_indices is None else [int(i) for i in class_indices]
    logits = module.sliding_window_logits(image[None].to(device), idx, device="cpu")[0]
    probs = logits.softmax(0)
    local = probs.argmax(0)
    table = torch.tensor([0, *idx], dtype=torch.uint8)
    out = {"labels": table[local], "probs": probs}
    if similarity:
        if not isinstance(module.net, PrototypeSegmenter):
            raise ValueError("similarity maps need the prototype head, this checkpoint has a softmax head")
        out["similarity"] = logits * module.net.temperature.detach().cpu()  # cos = logit * tau
    return out
