"""Networks from plain-data specs, through an allow-list: a checkpoint is data, never code.

A network spec is ``{"class_path": "pkg.module.Class", "init_args": {...}}`` (what a YAML config and a
checkpoint's ``hyper_parameters`` hold). :func:`build_network` imports and calls the named class only when

1. its module lies in an allowed package: MONAI's networks (``monai.networks.nets``), cfseg's own network
   modules (``cfseg.nets``, and ``cfseg.heads`` for segmentation heads), or a package the *user* trusts
   explicitly (the ``trusted_modules`` argument or the ``CFSEG_TRUSTED_MODULES`` environment variable,
   comma-separated), never one named by the file itself;
2. the attribute is a class and a subclass of :class:`torch.nn.Module`.

The package check runs on the string, before anything is imported, so a checkpoint naming ``os.makedirs``,
``subprocess.run`` or ``builtins.eval`` is refused with no side effect; a non-``nn.Module`` class inside an
allowed package is refused before it is called.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Iterable
from typing import Any

from torch import nn

ALLOWED_PACKAGES: tuple[str, ...] = ("monai.networks.nets", "cfseg.nets", "cfseg.heads")
TRUSTED_ENV = "CFSEG_TRUSTED_MODULES"


class UntrustedSpecError(ValueError):
    """A network spec names something outside the allow-list, or something that is not an ``nn.Module``."""


def trusted_packages(extra: Iterable[str] | None = None) -> tuple[str, ...]:
    """The allowed packages: the built-in ones, ``extra`` and those listed in ``$CFSEG_TRUSTED_MODULES``."""
    env = [m.strip() for m in os.environ.get(TRUSTED_ENV, "").split(",") if m.strip()]
    return (*ALLOWED_PACKAGES, *(extra or ()), *env)


def _in_package(module_name: str, package: str) -> bool:
    return module_name == package or module_name.startswith(package + ".")


def check_spec(spec: Any, trusted_modules: Iterable[str] | None = None) -> tuple[str, str]:
    """Validate a spec's shape and its class path against the allow-list, importing nothing.

    Returns:
        ``(module_name, class_name)``.

    Raises:
        UntrustedSpecError: a malformed spec or a class path outside the allowed packages.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise UntrustedSpecError(f"expected a network spec {{'class_path': str, 'init_args': {{...}}}}, got {spec!r}")
    if not isinstance(spec.get("init_args", {}), dict):
        raise UntrustedSpecError(f"init_args of {spec['class_path']!r} must be a mapping, got {spec['init_args']!r}")
    module_name, _, cls_name = spec["class_path"].rpartition(".")
    allowed = trusted_packages(trusted_modules)
    if not module_name or not cls_name.isidentifier() or not any(_in_package(module_name, p) for p in allowed):
        raise UntrustedSpecError(
            f"refusing to build {spec['class_path']!r}: networks are built only from {', '.join(allowed)} "
            f"(to use your own network, trust its module explicitly: trusted_modules=[...] or "
            f"{TRUSTED_ENV}=your.package)"
        )
    return module_name, cls_name


def resolve_class(spec: dict[str, Any], trusted_modules: Iterable[str] | None = None) -> type[nn.Module]:
    """The ``nn.Module`` subclass a spec names, after :func:`check_spec` (nothing is called).

    Raises:
        UntrustedSpecError: outside the allow-list, not a class, or not an ``nn.Module`` subclass.
        ValueError: the module or class does not exist.
    """
    module_name, cls_name = check_spec(spec, trusted_modules)
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {spec['class_path']!r}: {e}") from e
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise UntrustedSpecError(f"refusing to build {spec['class_path']!r}: not a torch.nn.Module subclass")
    return cls


def build_network(spec: dict[str, Any], trusted_modules: Iterable[str] | None = None,
                  defaults: dict[str, Any] | None = None) -> nn.Module:
    """Build the ``nn.Module`` a spec names, after :func:`check_spec` and a subclass check.

    Args:
        spec: ``{"class_path": ..., "init_args": {...}}``.
        trusted_modules: packages the caller trusts beyond :data:`ALLOWED_PACKAGES` (never read from a file).
        defaults: values for constructor parameters the spec does not set, passed only where the class's
            ``__init__`` names them (e.g. the feature width and class count a head needs).

    Raises:
        UntrustedSpecError: outside the allow-list, not a class, or not an ``nn.Module`` subclass.
        ValueError: the module or class does not exist.
    """
    cls = resolve_class(spec, trusted_modules)
    args = dict(spec.get("init_args", {}))
    if defaults:
        params = inspect.signature(cls.__init__).parameters
        args = {**{k: v for k, v in defaults.items() if k in params and k not in args}, **args}
    return cls(**args)
