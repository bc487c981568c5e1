"""Local POD (PLOP, Douillard et al., CVPR 2021): multi-scale pooled distillation of intermediate activations.

:func:`resolve_layers` names the backbone modules to compare, :func:`capture_activations` collects their outputs
during a forward pass, :func:`local_pod` compares student and teacher activations. Teacher tensors are constants.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfseg.losses import as_compute_dtype, check_class_tensor

#: Encoder and decoder blocks at each resolution of ``monai.networks.nets.UNet`` (``model.0``, ``model.2``,
#: ``model.1.submodule.0``, ``model.1.submodule.2``, ...); the bottleneck feeds the deepest decoder block.
DEFAULT_POD_LAYERS: tuple[str, ...] = (r"model(\.1\.submodule)*\.[02]",)


def resolve_layers(module: nn.Module, patterns: Sequence[str], setting: str = "pod_layers",
                   names: Sequence[str] | None = None, what: str = "module") -> list[str]:
    """Names of ``module``'s submodules (or of ``names``) that fully match any regular expression in ``patterns``.

    Args:
        setting: the option the patterns come from, named in errors (``pod_layers``, ``expert_layers``).
        names: the candidate names (default: every named submodule).
        what: what the candidates are, named in errors.

    Raises:
        ValueError: a pattern that is not a valid regex or matches nothing (some module names are listed).
    """
    names = [n for n, _ in module.named_modules() if n] if names is None else list(names)
    out: list[str] = []
    for p in patterns:
        try:
            rx = re.compile(p)
        except re.error as e:
            raise ValueError(f"{setting} pattern {p!r} is not a regular expression: {e}") from None
        hits = [n for n in names if rx.fullmatch(n)]
        if not hits:
            raise ValueError(
                f"{setting} pattern {p!r} matches no {what} of {type(module).__name__}; "
                f"names look like {names[:8]} (set model.{setting} to regexes of module names)"
            )
        out += [n for n in hits if n not in out]
    return out


@contextmanager
def capture_activations(module: nn.Module, names: Sequence[str]) -> Iterator[list[Tensor]]:
    """Collect the outputs of ``module``'s submodules ``names`` during the forward passes in the block.

    The yielded list is filled, in the order of ``names``, when the block exits; the hooks are removed.
    """
    mods = dict(module.named_modules())
    store: dict[str, Tensor] = {}

    def hook(name: str):
        def fn(_m: nn.Module, _i: Any, out: Any) -> None:
            store[name] = out[0] if isinstance(out, (tuple, list)) else out
        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    acts: list[Tensor] = []
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in store]
    if missing:
        raise ValueError(f"modules {missing} did not run in the forward pass; choose other pod_layers")
    acts.extend(store[n] for n in names)


def _pod_embedding(x: Tensor, scale: int, normalize: bool, eps: float) -> Tensor | None:
    """[B, C, *S] -> [B, scale^d, L] window embeddings (None when a side is shorter than ``scale``)."""
    b, c, *sizes = x.shape
    d = len(sizes)
    ks = [n // scale for n in sizes]
    if min(ks) == 0:
        return None
    if any(scale * k != n for k, n in zip(ks, sizes, strict=True)):
        x = x[(..., *[slice(0, scale * k) for k in ks])]
    view = [b, c]
    for k in ks:
        view += [scale, k]
    x = x.reshape(view)  # [B, C, s, k1, .., s, kd]: a view of a contiguous map, windows interleaved
    win_dims = [2 + 2 * i for i in range(d)]
    k_dims = [3 + 2 * i for i in range(d)]
    profiles = []
    for i in range(d):  # pool along every other spatial axis: one 1D profile per axis and window
        others = [k_dims[j] for j in range(d) if j != i]
        p = x.mean(dim=others, keepdim=True) if others else x
        profiles.append(p.permute(0, *win_dims, 1, *k_dims).reshape(b, scale**d, -1))  # small: [B, W, C*k_i]
    emb = torch.cat(profiles, dim=-1)
    return F.normalize(emb, dim=-1, eps=eps) if normalize else emb


def _pod_embeddings_nested(x: Tensor, scales: Sequence[int], normalize: bool, eps: float) -> list[Tensor]:
    """Fast path of :func:`_pod_embedding` for every scale at once when all scales divide ``m = max(scales)``
    and ``m`` divides every side: one reduction of the full map per axis (block means on the m-grid), the
    coarser windows averaged from those small profiles."""
    b, c, *sizes = x.shape
    d = len(sizes)
    m = max(scales)
    view = [b, c]
    for n in sizes:
        view += [m, n // m]
    xv = x.reshape(view)
    k_dims = [3 + 2 * i for i in range(d)]
    grids = [xv.mean(dim=[k_dims[j] for j in range(d) if j != i], keepdim=True) if d > 1 else xv
             for i in range(d)]  # grids[i]: [B, C, m, 1|k_i, ...], k kept on axis i only
    out = []
    for s in scales:
        profiles = []
        for i, g in enumerate(grids):
            shape = [b, c]
            for j, n in enumerate(sizes):
                shape += [s, m // s, n // m if j == i else 1]
            g = g.reshape(shape)  # [B, C, (s, m/s, k|1) per axis]
            others = [2 + 3 * j + 1 for j in range(d) if j != i]
            g = g.mean(dim=others, keepdim=True) if others else g
            win = [2 + 3 * j for j in range(d)]
            rest = [dim for j in range(d) for dim in (3 + 3 * j, 4 + 3 * j)]
            profiles.append(g.permute(0, *win, 1, *rest).reshape(b, s**d, -1))  # [B, W, C * n_i / s]
        emb = torch.cat(profiles, dim=-1)
        out.append(F.normalize(emb, dim=-1, eps=eps) if normalize else emb)
    return out


def _pod_all_scales(x: Tensor, scales: Sequence[int], normalize: bool, eps: float) -> list[Tensor]:
    """Window embeddings [B, s^d, L] of every scale that fits ``x`` [B, C, *S]."""
    m = max(scales)
    if all(m % s == 0 for s in scales) and all(n % m == 0 for n in x.shape[2:]):
        return _pod_embeddings_nested(x, scales, normalize, eps)
    return [e for s in scales if (e := _pod_embedding(x, s, normalize, eps)) is not None]


def local_pod(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    scales: Sequence[int] = (1, 2, 4),
    *,
    square: bool = True,
    normalize: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """Local POD distillation (PLOP, Douillard et al., CVPR 2021), in 3D (any number of spatial axes).

    For every feature map and scale ``s`` the volume is split into ``s^d`` windows (sides ``n // s``, the
    remainder dropped as in the reference code; a scale larger than a side is skipped for that map). In each
    window the (squared, as PLOP's ``pow``) activations are averaged over all spatial axes but one, giving one
    1D profile per axis; the profiles are concatenated and L2-normalised per window. Per sample the distance is
    ``sqrt(mean_scales mean_windows ||e_student - e_teacher||^2)`` (in [0, 2] when normalised); the loss is its
    mean over the batch and the maps.

    Args:
        student_feats: feature maps [B, C_l, *S_l], one per layer.
        teacher_feats: the teacher's maps of the same shapes; treated as constants (detached).
        scales: window counts per axis (1: whole volume, 2: halves, 4: quarters).
        square: square the activations first (PLOP's default ``pod_prepro="pow"``).
        normalize: L2-normalise each window's embedding (scale-free; the reference leaves it unnormalised).

    Returns:
        Scalar tensor (float32 for half inputs), 0 for identical maps, with finite gradients there.

    Raises:
        ValueError: different numbers of maps, a shape mismatch (both named), no maps or a bad scale.
    """
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"need the same non-zero number of student and teacher maps, got {len(student_feats)} "
                         f"and {len(teacher_feats)}.")
    if not scales or any(int(s) != s or s < 1 for s in scales):
        raise ValueError(f"scales must be positive integers, got {tuple(scales)}; e.g. (1, 2, 4).")
    total = None
    for i, (s, t) in enumerate(zip(student_feats, teacher_feats, strict=True)):
        check_class_tensor(s, f"student_feats[{i}]")
        if s.shape != t.shape:
            raise ValueError(f"student_feats[{i}] has shape {tuple(s.shape)} but teacher_feats[{i}] has shape "
                             f"{tuple(t.shape)}; the maps must match layer by layer.")
        sx = as_compute_dtype(s, f"student_feats[{i}]")
        tx = as_compute_dtype(t, f"teacher_feats[{i}]").detach().to(sx.dtype)
        if square:
            sx, tx = sx * sx, tx * tx
        sc = [int(v) for v in scales]
        diffs = [(es - et).flatten(1) / math.sqrt(es.shape[1])
                 for es, et in zip(_pod_all_scales(sx, sc, normalize, eps), _pod_all_scales(tx, sc, normalize, eps),
                                   strict=True)]
        d = torch.cat(diffs, dim=1) / math.sqrt(len(diffs))  # scale 1 always fits
        layer = torch.linalg.vector_norm(d, dim=1).mean()
        total = layer if total is None else total + layer
    return total / len(student_feats)
