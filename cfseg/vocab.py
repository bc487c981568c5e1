"""Canonical class names and synonyms.

Every dataset names its classes its own way ("right kidney", "kidney_right", "RightKidney", "Kidney (R)").
cfseg keys everything by one canonical snake_case name, so labels from different datasets are remapped by
*name* into one experiment-wide class list.

Canonical form: lower-case snake_case with the side as a suffix (``kidney_right``, ``parotid_gland_left``),
the convention of TotalSegmentator and OpenKBP. :func:`canonical_name` normalises case, separators, CamelCase
and side words; :data:`SYNONYMS` maps further aliases (``spinal cord`` is already ``spinal_cord``, but
``cord`` -> ``spinal_cord`` needs an entry).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

BACKGROUND = "background"

_SIDES = {
    "left": "left", "l": "left", "lt": "left", "sinister": "left",
    "right": "right", "r": "right", "rt": "right", "dexter": "right",
}

#: alias (already snake_cased) -> canonical name.
SYNONYMS: dict[str, str] = {
    "bg": BACKGROUND,
    "clear_label": BACKGROUND,
    "cord": "spinal_cord",
    "spinalcord": "spinal_cord",
    "spine_cord": "spinal_cord",
    "brain_stem": "brainstem",
    "oesophagus": "esophagus",
    "parotid_left": "parotid_gland_left",
    "parotid_right": "parotid_gland_right",
    "gall_bladder": "gallbladder",
    "gb": "gallbladder",
    "ivc": "inferior_vena_cava",
    "postcava": "inferior_vena_cava",
    "adrenal_gland_left": "adrenal_gland_left",
    "hepar": "liver",
    "lien": "spleen",
    "ren_left": "kidney_left",
    "ren_right": "kidney_right",
    "left_lung": "lung_left",
    "pancreatic": "pancreas",
    "tumour": "tumor",
}


def _snake(name: str) -> str:
    """``"RightKidney (L)"`` -> ``"right_kidney_l"``: split CamelCase, lower, non-alphanumerics to ``_``."""
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.strip())
    s = re.sub(r"[^0-9a-zA-Z]+", "_", s).strip("_").lower()
    return s


def canonical_name(name: str) -> str:
    """Canonical snake_case class name.

    Examples:
        >>> canonical_name("right kidney"), canonical_name("RightKidney"), canonical_name("Kidney (R)")
        ('kidney_right', 'kidney_right', 'kidney_right')

    Raises:
        ValueError: if ``name`` is empty or has no letters.
    """
    if not isinstance(name, str) or not re.search(r"[A-Za-z]", name):
        raise ValueError(f"class name {name!r} is empty or has no letters")
    tokens = _snake(name).split("_")
    side = None
    rest: list[str] = []
    for tok in tokens:
        if tok in _SIDES and side is None and len(tokens) > 1:
            side = _SIDES[tok]
        else:
            rest.append(tok)
    base = "_".join(rest)
    base = SYNONYMS.get(base, base)
    full = f"{base}_{side}" if side else base
    return SYNONYMS.get(full, full)


def natural_text(name: str) -> str:
    """Readable text for prompts: ``"kidney_left"`` -> ``"left kidney"``, ``"spinal_cord"`` -> ``"spinal cord"``."""
    tokens = canonical_name(name).split("_")
    if len(tokens) > 1 and tokens[-1] in ("left", "right"):
        tokens = [tokens[-1], *tokens[:-1]]
    return " ".join(tokens)


def close_matches(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """Known names closest to ``name`` (for "did you mean" hints)."""
    try:
        key = canonical_name(name)
    except ValueError:
        key = str(name)
    return difflib.get_close_matches(key, list(known), n=n, cutoff=0.5)


def unknown_class_error(name: str, known: Sequence[str], where: str = "") -> ValueError:
    """A ValueError for an unknown class name, listing known classes and close matches."""
    hint = close_matches(name, known)
    msg = f"unknown class {name!r}{' in ' + where if where else ''}"
    if hint:
        msg += f"; did you mean {', '.join(hint)}?"
    msg += f" Known classes: {', '.join(known)}"
    return ValueError(msg)


class Vocabulary:
    """An ordered list of canonical class names; index 0 is always background.

    Args:
        classes: foreground class names in order (any spelling; stored canonical). Duplicates after
            canonicalisation are an error.

    The global index of a class is its position in ``names`` (background = 0).
    """

    def __init__(self, classes: Iterable[str]):
        names = [BACKGROUND]
        for raw in classes:
            name = canonical_name(raw)
            if name == BACKGROUND:
                continue
            if name in names:
                raise ValueError(f"class {raw!r} appears twice in the vocabulary (canonical name {name!r})")
            names.append(name)
        self.names: list[str] = names
        self._index = {n: i for i, n in enumerate(names)}

    @property
    def classes(self) -> list[str]:
        """Foreground class names (without background)."""
        return self.names[1:]

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        try:
            return canonical_name(name) in self._index
        except ValueError:
            return False

    def __iter__(self):
        return iter(self.names)

    def __repr__(self) -> str:
        return f"Vocabulary({self.classes})"

    def index(self, name: str, where: str = "") -> int:
        """Global index of ``name`` (any spelling). Raises a ValueError with close matches if unknown."""
        key = canonical_name(name)
        if key not in self._index:
            raise unknown_class_error(name, self.classes, where)
        return self._index[key]

    def extend(self, classes: Iterable[str]) -> Vocabulary:
        """A new vocabulary with ``classes`` appended; a repeated class is an error naming it."""
        for raw in classes:
            if raw in self and canonical_name(raw) != BACKGROUND:
                raise ValueError(
                    f"class {raw!r} is already in the vocabulary (as {canonical_name(raw)!r}); "
                    "a stage may only add new classes"
                )
        return Vocabulary([*self.classes, *classes])

    @staticmethod
    def union(class_lists: Iterable[Iterable[str]]) -> Vocabulary:
        """Vocabulary of the union of several class lists, in order of first appearance."""
        seen: list[str] = []
        for lst in class_lists:
            for raw in lst:
                name = canonical_name(raw)
                if name != BACKGROUND and name not in seen:
                    seen.append(name)
        return Vocabulary(seen)
