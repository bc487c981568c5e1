"""Make ``import torchvision`` work when its compiled ops cannot load (CPU-only torch + CUDA torchvision).

On machines where only a CPU build of torch exists, the one torchvision release that accepts that torch is a
CUDA build whose ``_C.so`` needs ``libtorch_cuda.so``. torchvision then skips its ops library, but its
``_meta_registrations`` still registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``, which
raises ``RuntimeError: operator torchvision::nms does not exist``; ``lightning``, ``torchmetrics`` and
``open_clip`` all import torchvision and fail with it.

The fix is to define those two op schemas (no kernels) before torchvision is first imported, and only when
its compiled ops really cannot load. Everywhere else (a GPU machine with matching builds, a CPU machine with a
working torchvision, no torchvision at all) it does nothing. Calling ``torchvision.ops.nms`` afterwards fails
with torch's "no kernel" error, which is honest: the compiled ops are not there. cfseg does not use them.

It is wired in two ways:

* ``make install`` writes ``cfseg_torchvision_compat.pth`` into the venv's site-packages
  (``python -m cfseg._torchvision_compat --install-pth``); the interpreter runs it at start-up and it installs
  a lazy import hook, so nothing is imported until something imports torchvision.
* ``import cfseg`` installs the same hook, for environments set up without the ``.pth``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "cfseg_torchvision_compat.pth"
PTH_LINE = "import cfseg._torchvision_compat as _cfseg_tvc; _cfseg_tvc.install_import_hook()\n"
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_state: dict[str, object] = {"patched": False, "library": None}


def _torchvision_ops_path() -> Path | None:
    """Path of torchvision's compiled ops library, found without importing torchvision."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for candidate in sorted(Path(folder).glob("_C*.so")) + sorted(Path(folder).glob("_C*.pyd")):
            return candidate
    return None


def compiled_ops_loadable() -> bool:
    """True when torchvision's ``_C`` library loads with the installed torch (or torchvision is absent)."""
    path = _torchvision_ops_path()
    if path is None:
        return True
    import torch

    try:
        torch.ops.load_library(str(path))
    except (OSError, ImportError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> bool:
    """Define the ``torchvision::nms``/``qnms`` schemas if torchvision's compiled ops cannot load.

    Returns:
        True when the schemas were defined by this call or an earlier one, False when nothing was needed.
    """
    if _state["patched"]:
        return True
    if "torchvision" in sys.modules or compiled_ops_loadable():
        return False
    import torch

    lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - kept alive in _state
    for schema in SCHEMAS:
        lib.define(schema)
    _state.update(patched=True, library=lib)
    return True


class _TorchvisionImportHook(importlib.abc.MetaPathFinder):
    """Runs :func:`ensure_torchvision_importable` once, right before torchvision is first imported."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        if fullname == "torchvision":
            uninstall_import_hook()
            ensure_torchvision_importable()
        return None  # let the normal finders import the real module


def install_import_hook() -> None:
    """Arrange for the fix to run lazily when torchvision is first imported (idempotent)."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _TorchvisionImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionImportHook())


def uninstall_import_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionImportHook)]


def install_pth(site_packages: str | None = None) -> Path:
    """Write the start-up ``.pth`` file into ``site_packages`` (default: the running interpreter's)."""
    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    target.write_text(PTH_LINE)
    return target


if __name__ == "__main__":
    if sys.argv[1:] == ["--install-pth"]:
        print(f"wrote {install_pth()}")
    else:
        sys.exit("usage: python -m cfseg._torchvision_compat --install-pth")
