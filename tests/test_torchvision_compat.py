"""The start-up fix that lets lightning/torchmetrics/open_clip import with CPU torch + CUDA torchvision."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from cfseg import _torchvision_compat as tvc


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_pth_installed_by_make_install():
    pth = Path(sysconfig.get_paths()["purelib"]) / tvc.PTH_NAME
    assert pth.is_file(), "make install writes the start-up hook; run `make install`"
    assert pth.read_text() == tvc.PTH_LINE


def test_libraries_import_in_a_fresh_interpreter():
    r = run("import lightning, torchmetrics, open_clip, torchvision; print('ok')")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


def test_without_the_hook_torchvision_breaks_here():
    """Documents why the fix exists; skipped on machines where torchvision's compiled ops load."""
    if tvc.compiled_ops_loadable():
        pytest.skip("torchvision's compiled ops load on this machine: the fix is a no-op here")
    r = run("import cfseg._torchvision_compat as t; t.uninstall_import_hook(); import torchvision")
    assert r.returncode != 0 and "torchvision::nms does not exist" in r.stderr


def test_hook_defines_only_the_missing_schemas():
    code = (
        "import torch, cfseg._torchvision_compat as t; import torchvision;"
        "print(t._state['patched'], t.compiled_ops_loadable());"
        "print(hasattr(torch.ops.torchvision, 'nms'))"
    )
    r = run(code)
    assert r.returncode == 0, r.stderr[-2000:]
    patched, loadable = r.stdout.split()[:2]
    assert (patched == "True") == (loadable == "False")  # patched exactly when the compiled ops cannot load
    assert r.stdout.split()[2] == "True"


def test_noop_when_ops_load(monkeypatch):
    monkeypatch.setattr(tvc, "compiled_ops_loadable", lambda: True)
    monkeypatch.setitem(tvc._state, "patched", False)
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    assert tvc.ensure_torchvision_importable() is False
    assert tvc._state["patched"] is False


def test_hook_removes_itself():
    r = run("import sys, cfseg._torchvision_compat as t; import torchvision;"
            "print(any(isinstance(f, t._TorchvisionImportHook) for f in sys.meta_path))")
    assert r.returncode == 0 and r.stdout.strip() == "False"
