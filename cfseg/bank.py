"""Prototypes from class embeddings: Gram-Schmidt (order, drift warning), random orthonormal rows, PrototypeBank.

A class is a fixed unit vector derived from the text embedding of its name (:func:`cfseg.text.cache.class_embeddings`).
Gram-Schmidt in the order the classes were added (:func:`gram_schmidt`) makes the prototypes orthonormal,
background first. A class added later is orthogonalised against all earlier ones, so earlier prototypes never
change (:meth:`PrototypeBank.extend`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cfseg.text.cache import class_embeddings_and_prompts
from cfseg.text.encoders import TextEncoder
from cfseg.text.prompts import check_templates, normalize_modality
from cfseg.vocab import BACKGROUND, canonical_name, unknown_class_error

__all__ = [
    "GS_COSINE_WARNING",
    "PROTOTYPE_METHODS",
    "PrototypeBank",
    "PrototypeDriftWarning",
    "gram_schmidt",
    "gram_schmidt_drift",
    "gram_schmidt_order",
    "random_orthonormal",
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
        self.templates: list[str] | None = list(check_templates(templates)) if templates is not None else None
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
        emb, prompts = class_embeddings_and_prompts(encoder, keys, mod, templates, cache_dir)
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
        emb, prompts = class_embeddings_and_prompts(encoder, keys, self.modality, tpl, cache_dir)
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
