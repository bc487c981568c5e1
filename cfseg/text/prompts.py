"""Prompt templates per modality, modality aliases and the prompts of one class.

A class's prompts (:func:`prompts_for`) are :data:`PROMPT_TEMPLATES` of its modality (or custom templates) filled
with the natural text of its name; background gets :data:`BACKGROUND_PROMPTS` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from cfseg.vocab import BACKGROUND, canonical_name, natural_text

__all__ = ["BACKGROUND_PROMPTS", "PROMPT_TEMPLATES", "check_templates", "normalize_modality", "prompts_for"]

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


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """The templates as a tuple; raises a ValueError unless it is a non-empty sequence of strings with ``{name}``."""
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
    tpl = PROMPT_TEMPLATES[mod] if templates is None else check_templates(templates)
    text = natural_text(key)
    return [t.format(name=text) for t in tpl]
