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

3. no constructor argument may fetch or open a file (:func:`fetching_arguments`). Several allow-listed MONAI
   classes download or read weights in their constructor (HoVerNet's ``pretrained_url``, ``pretrained=True`` of
   DenseNet, EfficientNet, SENet, ResNetFeatures, MILModel, FlexibleUNet, TorchVisionFCModel's ``weights``,
   Transchex's ``path_or_repo_id``). An argument is *fetching* when

   * its name contains ``pretrain`` or ``download`` and its value is true (any truthy value), or
   * its name contains ``url``, ``uri``, ``path``, ``file``, ``dir``, ``ckpt``, ``checkpoint``, ``cache``,
     ``repo``, ``hub`` or ``weights`` and its value is, or holds, a non-empty string (a path, URL, repo id or
     weights name; numbers and booleans pass: ``use_checkpoint=True``, ``dropout_path_rate=0.1``), or
   * its value is, or holds, a string with a URL scheme (``https://``, ``file://``, ``s3://``...), whatever
     its name.

   A spec setting a fetching argument is refused by :func:`check_spec` from the string alone, before anything is
   imported, with a message naming the argument; a fetching *default* of the class (``pretrained=True`` of
   EfficientNetBN, MILModel, ResNetFeatures) is forced off (``False``) by :func:`build_network`, and one that
   cannot be turned off (a default string such as Transchex's ``path_or_repo_id``) is refused, both before the
   constructor runs. The rule holds for every spec, a checkpoint's or a config's, because a config's spec is what
   the checkpoint stores and a checkpoint's weights replace pretrained ones anyway. A user who wants a
   constructor to fetch (training from pretrained weights) says so in the environment, never in a file:
   ``CFSEG_ALLOW_FETCH=1`` (or ``allow_fetch=True`` in Python); a checkpoint trained so then loads only with it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Iterable
from typing import Any

from torch import nn

ALLOWED_PACKAGES: tuple[str, ...] = ("monai.networks.nets", "cfseg.nets", "cfseg.heads")
TRUSTED_ENV = "CFSEG_TRUSTED_MODULES"
FETCH_ENV = "CFSEG_ALLOW_FETCH"

#: argument names that fetch when their value is true
FETCH_FLAG = re.compile(r"pretrain|download", re.IGNORECASE)
#: argument names that fetch or open when their value holds a string
FETCH_NAME = re.compile(r"url|uri|path|file|dir|ckpt|checkpoint|cache|repo|hub|weights", re.IGNORECASE)
#: a string with a URL scheme, fetching whatever the argument's name
URL_VALUE = re.compile(r"^\s*[a-zA-Z][a-zA-Z0-9+.-]*://")


class UntrustedSpecError(ValueError):
    """A network spec names something outside the allow-list, or something that is not an ``nn.Module``."""


def trusted_packages(extra: Iterable[str] | None = None) -> tuple[str, ...]:
    """The allowed packages: the built-in ones, ``extra`` and those listed in ``$CFSEG_TRUSTED_MODULES``."""
    env = [m.strip() for m in os.environ.get(TRUSTED_ENV, "").split(",") if m.strip()]
    return (*ALLOWED_PACKAGES, *(extra or ()), *env)


def fetch_allowed(allow_fetch: bool | None = None) -> bool:
    """Whether constructors may fetch or open files: ``allow_fetch`` if given, else ``$CFSEG_ALLOW_FETCH``."""
    if allow_fetch is not None:
        return bool(allow_fetch)
    return os.environ.get(FETCH_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _strings(value: Any) -> list[str]:
    """Every string in ``value`` (nested in mappings, lists and tuples)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _fetches(name: str, value: Any) -> bool:
    """Whether argument ``name`` set to ``value`` fetches or opens a file (the rule in the module doc)."""
    if FETCH_FLAG.search(name) and not isinstance(value, str) and bool(value):
        return True
    strings = [s for s in _strings(value) if s.strip()]
    if FETCH_NAME.search(name) or FETCH_FLAG.search(name):
        if strings:
            return True
    return any(URL_VALUE.match(s) for s in strings)


def fetching_arguments(init_args: dict[str, Any]) -> list[str]:
    """Names of the arguments in ``init_args`` that would fetch or open a file (see the module doc)."""
    return [str(k) for k, v in init_args.items() if _fetches(str(k), v)]


def _fetch_refusal(class_path: str, names: list[str], init_args: dict[str, Any], what: str = "") -> str:
    shown = ", ".join(f"{n}={init_args[n]!r}" for n in names)
    return (f"refusing to build {class_path!r}: {what}argument{'s' * (len(names) > 1)} {shown} would fetch or open "
            f"a file in its constructor; a network spec (a checkpoint's or a config's) may not make it do so "
            f"(weights come from the checkpoint; to train from pretrained weights, set {FETCH_ENV}=1 in the "
            f"environment)")


def _in_package(module_name: str, package: str) -> bool:
    return module_name == package or module_name.startswith(package + ".")


def check_spec(spec: Any, trusted_modules: Iterable[str] | None = None,
               allow_fetch: bool | None = None) -> tuple[str, str]:
    """Validate a spec's shape, its class path against the allow-list and its arguments against the fetching rule
    (module doc; ``allow_fetch`` None: ``$CFSEG_ALLOW_FETCH``), importing nothing.

    Returns:
        ``(module_name, class_name)``.

    Raises:
        UntrustedSpecError: a malformed spec, a class path outside the allowed packages or an argument that would
            fetch or open a file.
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
    init_args = spec.get("init_args") or {}
    fetching = fetching_arguments(init_args)
    if fetching and not fetch_allowed(allow_fetch):
        raise UntrustedSpecError(_fetch_refusal(spec["class_path"], fetching, init_args))
    return module_name, cls_name


def resolve_class(spec: dict[str, Any], trusted_modules: Iterable[str] | None = None,
                  allow_fetch: bool | None = None) -> type[nn.Module]:
    """The ``nn.Module`` subclass a spec names, after :func:`check_spec` (nothing is called).

    Raises:
        UntrustedSpecError: outside the allow-list, not a class, or not an ``nn.Module`` subclass.
        ValueError: the module or class does not exist.
    """
    module_name, cls_name = check_spec(spec, trusted_modules, allow_fetch)
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {spec['class_path']!r}: {e}") from e
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise UntrustedSpecError(f"refusing to build {spec['class_path']!r}: not a torch.nn.Module subclass")
    return cls


def build_network(spec: dict[str, Any], trusted_modules: Iterable[str] | None = None,
                  defaults: dict[str, Any] | None = None, allow_fetch: bool | None = None) -> nn.Module:
    """Build the ``nn.Module`` a spec names, after :func:`check_spec`, a subclass check and the fetching rule on
    the class's own defaults (a true ``pretrained``-like default is forced to ``False``; a fetching default that
    cannot be turned off is refused), all before the constructor runs.

    Args:
        spec: ``{"class_path": ..., "init_args": {...}}``.
        trusted_modules: packages the caller trusts beyond :data:`ALLOWED_PACKAGES` (never read from a file).
        defaults: values for constructor parameters the spec does not set, passed only where the class's
            ``__init__`` names them (e.g. the feature width and class count a head needs).
        allow_fetch: let constructors fetch or open files (None: ``$CFSEG_ALLOW_FETCH``; never from a file).

    Raises:
        UntrustedSpecError: outside the allow-list, not a class, not an ``nn.Module`` subclass, or an argument
            (set or default) that would fetch or open a file.
        ValueError: the module or class does not exist.
    """
    cls = resolve_class(spec, trusted_modules, allow_fetch)
    args = dict(spec.get("init_args", {}))
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        params = {}
    if defaults:
        args = {**{k: v for k, v in defaults.items() if k in params and k not in args}, **args}
    if not fetch_allowed(allow_fetch):
        fixed: dict[str, Any] = {}
        for name, p in params.items():
            if name in args or p.default is inspect.Parameter.empty or not _fetches(name, p.default):
                continue
            if isinstance(p.default, bool) or (FETCH_FLAG.search(name) and not _strings(p.default)):
                args[name] = False  # pretrained=True by default: off (the checkpoint's weights are loaded after)
            else:
                fixed[name] = p.default
        if fixed:
            raise UntrustedSpecError(_fetch_refusal(spec["class_path"], list(fixed), fixed, "its default "))
    return cls(**args)
