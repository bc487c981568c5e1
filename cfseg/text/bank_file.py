"""Precomputed bank files: class name -> text embedding, with the encoder id, modality and prompts (JSON).

:func:`save_bank_file` writes one (e.g. with CLIP on a connected machine);
:class:`cfseg.text.encoders.PrecomputedTextEncoder` (encoder spec ``bank:/path/bank.json``) reads it back
where that encoder's weights are missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cfseg.text.cache import class_embeddings_and_prompts
from cfseg.text.encoders import TextEncoder
from cfseg.text.prompts import PROMPT_TEMPLATES, check_templates, normalize_modality
from cfseg.vocab import BACKGROUND, canonical_name

__all__ = ["BANK_FORMAT", "save_bank_file"]

#: The ``format`` field of a bank file.
BANK_FORMAT = "cfseg-text-bank"


def save_bank_file(
    path: str | os.PathLike,
    encoder: TextEncoder,
    names: Sequence[str],
    modality: str = "generic",
    templates: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a precomputed bank file (JSON, no pickle) for :class:`cfseg.text.encoders.PrecomputedTextEncoder`.

    Background is always included (first). Float32 values are written exactly (JSON floats round-trip).

    Args:
        path: output file (``.json``); written atomically.
        encoder: the encoder (e.g. CLIP on a connected machine).
        names: class names.
        modality: prompt set.
        templates: templates instead of ``PROMPT_TEMPLATES[modality]``.
        cache_dir: embedding cache folder.

    Returns:
        The path written.
    """
    mod = normalize_modality(modality)
    keys: list[str] = [BACKGROUND]
    for n in names:
        k = canonical_name(n)
        if k not in keys:
            keys.append(k)
    emb, prompts = class_embeddings_and_prompts(encoder, keys, mod, templates, cache_dir)
    data: dict[str, Any] = {
        "format": BANK_FORMAT,
        "version": 1,
        "encoder_id": encoder.encoder_id,
        "dim": int(emb.shape[1]),
        "modality": mod,
        "templates": list(check_templates(templates)) if templates is not None else list(PROMPT_TEMPLATES[mod]),
        "prompts": {k: p for k, p in zip(keys, prompts, strict=True)},
        "embeddings": {k: [float(x) for x in emb[i].tolist()] for i, k in enumerate(keys)},
    }
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out
