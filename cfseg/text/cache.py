"""Class embeddings: each class's prompts embedded, averaged and L2-normalised, cached in memory and on disk.

The cache is keyed by the sha256 of (encoder id, prompts, canonical name); a :class:`PrecomputedTextEncoder` is
looked up instead of encoded.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cfseg.text.encoders import PrecomputedTextEncoder, TextEncoder
from cfseg.text.prompts import normalize_modality, prompts_for
from cfseg.vocab import canonical_name

__all__ = ["class_embeddings", "class_embeddings_and_prompts", "clear_memory_cache", "default_cache_dir"]

_MEMORY_CACHE: dict[str, torch.Tensor] = {}


def clear_memory_cache() -> None:
    """Forget the in-process embedding cache (the disk cache stays)."""
    _MEMORY_CACHE.clear()


def default_cache_dir() -> Path:
    """``$CFSEG_CACHE_DIR/text`` when that variable is set, else ``~/.cache/cfseg/text``."""
    root = os.environ.get("CFSEG_CACHE_DIR")
    return Path(root).expanduser() / "text" if root else Path.home() / ".cache" / "cfseg" / "text"


def _cache_key(encoder_id: str, prompts: Sequence[str], name: str) -> str:
    payload = json.dumps([encoder_id, list(prompts), name], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _disk_get(cache_dir: Path, key: str, dim: int | None) -> torch.Tensor | None:
    f = cache_dir / f"{key}.npy"
    if not f.is_file():
        return None
    try:
        arr = np.load(f, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.ndim != 1 or (dim is not None and arr.shape[0] != dim) or not np.isfinite(arr).all():
        return None
    return torch.from_numpy(arr.astype(np.float32))


def _disk_put(cache_dir: Path, key: str, vec: torch.Tensor) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, vec.numpy().astype(np.float32), allow_pickle=False)
        os.replace(tmp, cache_dir / f"{key}.npy")
    except OSError as e:
        warnings.warn(f"cannot write the text-embedding cache in {cache_dir}: {e}", RuntimeWarning, stacklevel=3)


def class_embeddings_and_prompts(
    encoder: TextEncoder,
    names: Sequence[str],
    modality: str = "generic",
    templates: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> tuple[torch.Tensor, list[list[str]]]:
    """:func:`class_embeddings` ([N, D]) and the prompts each class was embedded with (N lists)."""
    keys = [canonical_name(n) for n in names]
    mod = normalize_modality(modality)
    if isinstance(encoder, PrecomputedTextEncoder):
        if not keys:
            return torch.zeros(0, encoder.dim), []
        vecs = [encoder.class_embedding(k, mod) for k in keys]
        prompts = []
        for k in keys:
            stored = encoder.prompts.get(k)
            if templates is not None and stored is not None and stored != prompts_for(k, mod, templates):
                raise ValueError(
                    f"bank {encoder.path} embedded {k!r} with prompts {stored}, not with the templates given "
                    f"({list(templates)}); re-export the bank with those templates or pass templates=None"
                )
            prompts.append(list(stored) if stored is not None else prompts_for(k, mod, encoder.templates))
        return torch.stack(vecs), prompts

    prompts = [prompts_for(k, mod, templates) for k in keys]
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out: list[torch.Tensor | None] = [None] * len(keys)
    todo: list[int] = []
    for i, (k, p) in enumerate(zip(keys, prompts, strict=True)):
        ck = _cache_key(encoder.encoder_id, p, k)
        hit = None
        if use_cache:
            hit = _MEMORY_CACHE.get(ck)
            if hit is None:
                hit = _disk_get(cdir, ck, None)
                if hit is not None:
                    _MEMORY_CACHE[ck] = hit
        if hit is None:
            todo.append(i)
        else:
            out[i] = hit.clone()
    if todo:
        flat = [t for i in todo for t in prompts[i]]
        emb = encoder.encode(flat).detach().float().cpu()
        if emb.ndim != 2 or emb.shape[0] != len(flat):
            raise ValueError(f"{encoder!r}.encode returned shape {tuple(emb.shape)} for {len(flat)} texts")
        start = 0
        for i in todo:
            n = len(prompts[i])
            vec = F.normalize(emb[start : start + n].mean(0), dim=0)
            start += n
            if not torch.isfinite(vec).all():
                raise ValueError(f"{encoder!r} gave a non-finite embedding for class {keys[i]!r}")
            out[i] = vec
            if use_cache:
                ck = _cache_key(encoder.encoder_id, prompts[i], keys[i])
                _MEMORY_CACHE[ck] = vec.clone()
                _disk_put(cdir, ck, vec)
    if not out:
        return torch.zeros(0, encoder.dim), []
    dims = {int(v.shape[0]) for v in out}  # type: ignore[union-attr]
    if len(dims) != 1:
        raise ValueError(f"cached embeddings of {encoder.encoder_id} have different widths {sorted(dims)}")
    return torch.stack(out), prompts  # type: ignore[arg-type]


def class_embeddings(
    encoder: TextEncoder,
    names: Sequence[str],
    modality: str = "generic",
    templates: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Per class: embed its prompts, average, L2-normalise.

    Cached in memory and on disk under ``cache_dir`` (default :func:`default_cache_dir`), keyed by the
    sha256 of (encoder_id, prompts, canonical name). A :class:`PrecomputedTextEncoder` is looked up instead.

    Args:
        encoder: any :class:`TextEncoder`.
        names: N class names (any spelling; background allowed).
        modality: prompt set ("generic", "ct", "mri").
        templates: templates instead of ``PROMPT_TEMPLATES[modality]``.
        cache_dir: disk cache folder.
        use_cache: False to always encode (and not write the cache).

    Returns:
        [N, D] float32, rows L2-normalised.
    """
    return class_embeddings_and_prompts(encoder, names, modality, templates, cache_dir, use_cache)[0]
