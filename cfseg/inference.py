"""Whole-volume prediction with a trained module: preprocessing from the checkpoint, modality detection,
sliding windows, labels over background plus any requested subset of classes in one forward pass (the head's rule:
argmax of a softmax head, threshold then argmax of a sigmoid head), similarity maps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cfseg.data.transforms import Preprocessing, build_transforms
from cfseg.module import CFSegModule


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


class ModalityError(ValueError):
    """The image's modality is unclear, or does not match what the checkpoint was trained on."""


#: Intensity at or below which a voxel counts as air in Hounsfield units (CT air is about -1000 HU).
AIR_HU = -500.0
#: Fraction of voxels at or below :data:`AIR_HU` that makes an image CT (air around or inside the body).
MIN_AIR_FRACTION = 1e-3
#: An MRI is essentially non-negative: its 0.5th percentile is at least ``-MRI_NEGATIVE_TOLERANCE`` times its
#: 99.5th (magnitude images; interpolation and bias correction leave small negatives).
MRI_NEGATIVE_TOLERANCE = 0.05


def intensity_sample(array: np.ndarray, max_samples: int) -> np.ndarray:
    """Every k-th voxel of ``array`` in C order, 1-D (k = ceil(size / max_samples); every voxel when there are no
    more than ``max_samples``), gathered by index so that an array that is not C-contiguous (nibabel's are
    Fortran-ordered) is never copied whole."""
    if array.size <= max_samples:
        return array.ravel()
    idx = np.arange(0, array.size, -(-array.size // max_samples))
    return array.reshape(-1)[idx] if array.flags.c_contiguous else array[np.unravel_index(idx, array.shape)]


def detect_modality(array: np.ndarray | torch.Tensor, max_samples: int = 2_000_000) -> tuple[str, str]:
    """Tell CT from MRI by intensities: CT is in Hounsfield units, MRI in non-negative arbitrary units.

    Rule: CT when at least :data:`MIN_AIR_FRACTION` of the voxels are at or below :data:`AIR_HU` (air, about
    -1000 HU); MRI when there is no such air and the intensities are essentially non-negative (0.5th percentile
    >= -:data:`MRI_NEGATIVE_TOLERANCE` x 99.5th percentile). Anything else (negative values but no air, e.g. a
    CT cropped inside the body or a z-scored MRI) is unclear. A CT stored without its HU offset (all values
    >= 0) looks like MRI: pass the modality explicitly then.

    Args:
        array: image intensities, any shape (a regular subsample of at most ``max_samples`` voxels is used).

    Returns:
        ``(modality, reason)``: ``"ct"`` or ``"mri"`` and a short human-readable reason.

    Raises:
        ModalityError: when the image fits neither rule.
    """
    a = torch.as_tensor(array).detach().cpu().numpy() if not isinstance(array, np.ndarray) else array
    if a.size == 0:
        raise ModalityError("cannot tell CT from MRI: the image is empty")
    a = intensity_sample(a, max_samples).astype(np.float32, copy=False)
    a = a[np.isfinite(a)]
    air = float(np.mean(a <= AIR_HU)) if a.size else 0.0
    lo, hi = (float(v) for v in np.percentile(a, [0.5, 99.5])) if a.size else (0.0, 0.0)
    if air >= MIN_AIR_FRACTION:
        return "ct", f"{air:.1%} of voxels <= {AIR_HU:g}, air in Hounsfield units; minimum {float(a.min()):g}"
    if lo >= -MRI_NEGATIVE_TOLERANCE * abs(hi):
        return "mri", f"non-negative arbitrary units (0.5th-99.5th percentile {lo:g} to {hi:g}), no air at -1000"
    raise ModalityError(
        f"cannot tell CT from MRI: no air (<= {AIR_HU:g}) as in a CT, but negative values (0.5th percentile "
        f"{lo:g}) unlike an MRI; pass --modality ct or --modality mri"
    )


def choose_modality(module: CFSegModule, array: np.ndarray | torch.Tensor,
                    modality: str | None = None, view: torch.Tensor | None = None) -> tuple[str, str, str | None]:
    """The modality to preprocess ``array`` with: the given one; else the modality router's answer when the
    checkpoint has one over two or more of its modalities and ``view`` (the image in the modality-neutral view
    [1, C, *S], :func:`cfseg.data.transforms.neutral_view`) is given; else the intensity rule
    (:func:`detect_modality`). The router's answer stands where the rule agrees or cannot tell (a z-scored MRI, a CT
    cropped inside the body); where they disagree the image is refused with both answers (e.g. a CT stored without
    its HU offset, which the rule alone reads as MRI; the neutral view does not see an offset).

    Returns:
        ``(modality, note, warning)``: ``note`` says how it was chosen (``"modality ct (detected: ...)"``);
        ``warning`` is set when a given modality contradicts what the image looks like.

    Raises:
        ModalityError: no modality given and the image is unclear, or looks like a modality the checkpoint was
            not trained on (pass ``modality`` to force it), or a given modality the checkpoint does not know.
    """
    known = sorted(module.preprocessing or {})
    if not known:
        raise ValueError("the checkpoint records no preprocessing; it was not trained with a cfseg data module")
    if modality is not None:
        if modality not in known:
            raise ModalityError(f"the checkpoint was trained on {known}, not {modality!r}")
        try:
            detected, reason = detect_modality(array)
        except ModalityError:
            return modality, f"modality {modality} (given)", None
        warning = None
        if detected != modality:
            warning = f"the image looks like {detected} ({reason}) but modality {modality} was given; using {modality}"
        return modality, f"modality {modality} (given)", warning
    router = module.modality_router if view is not None else None
    if router is not None and len(set(router.names) & set(known)) >= 2:
        scores = {m: v for m, v in module.modality_scores(view).items() if m in known}
        best = max(scores, key=scores.__getitem__)
        said = "router: " + ", ".join(f"{m} {v:.2f}" for m, v in scores.items())
        try:
            detected, reason = detect_modality(array)
        except ModalityError:
            return best, f"modality {best} ({said}; the intensity rule cannot tell)", None
        if detected != best:
            raise ModalityError(f"the modality router says {best} ({said}) but the intensity rule says {detected} "
                                f"({reason}); pass --modality {best} or --modality {detected}")
        return best, f"modality {best} ({said}; the intensity rule agrees)", None
    try:
        detected, reason = detect_modality(array)
    except ModalityError as e:
        raise ModalityError(f"{e} (the checkpoint knows {' and '.join(known)})") from None
    if detected not in known:
        raise ModalityError(
            f"the image looks like {detected} ({reason}) but the checkpoint was trained on {' and '.join(known)} "
            f"only; pass modality {known[0]!r} (--modality {known[0]}) to force it"
        )
    return detected, f"modality {detected} (detected: {reason})", None


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
    probabilities: bool = True,
) -> dict[str, torch.Tensor]:
    """Segment one preprocessed volume.

    Args:
        module: trained module (eval mode).
        image: [C, *S] preprocessed image.
        class_indices: global indices of the classes to segment (background always included); None = all.
        device: where the network runs (the sliding windows run there too); windows are stitched on the CPU,
            which bounds accelerator memory.
        similarity: also return cosine similarity maps (heads with ``has_similarity``: the prototype head).
        probabilities: also return ``probs`` (False: labels only, the full-resolution softmax or sigmoids are not
            computed; the labels are the same).

    Returns:
        ``labels``: uint8 [*S] in *global* class indices (:meth:`cfseg.heads.Head.labels`); ``probs`` (with
        ``probabilities``): float [K'+1, *S] over the requested classes (:meth:`cfseg.heads.Head.probabilities`:
        the softmax, or per-class sigmoids with background ``1 - max``); ``similarity``: float [K'+1, *S] when asked.
    """
    module = module.to(device).eval()
    idx = list(range(1, len(module.bank.names))) if class_indices is None else [int(i) for i in class_indices]
    x = image[None].to(device).as_subclass(torch.Tensor)  # plain tensor: no MetaTensor bookkeeping per window op
    logits = module.sliding_window_logits(x, idx, sw_device=device, device="cpu")[0]
    head = module.head
    local = head.labels(logits[None])[0]
    table = torch.tensor([0, *idx], dtype=torch.uint8)
    out = {"labels": table[local]}
    if probabilities:
        out["probs"] = head.probabilities(logits[None])[0]
    if similarity:
        if not head.has_similarity:
            raise ValueError(f"similarity maps need a cosine (prototype) head, this checkpoint has a "
                             f"{type(head).__name__}")
        if module.n_experts > 1:  # merged log-odds of several experts are not cosines
            raise ValueError("similarity maps of a checkpoint with LoRA experts are not defined (each class comes "
                             "from its own expert); segment without similarity maps")
        out["similarity"] = head.similarity(logits).detach()  # cos = logit * tau
    return out
