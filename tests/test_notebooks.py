"""The notebooks run top to bottom with the tiny budget, write only under a temporary folder and draw figures."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "cfseg-tests"


@pytest.fixture
def notebook_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kernel on this interpreter, Jupyter/IPython state and notebook outputs under ``tmp_path``.

    Returns:
        The folder the notebooks write their results to (``$CFSEG_NOTEBOOK_OUT``).
    """
    jupyter = tmp_path / "jupyter"
    # a kernel spec pointing at sys.executable (the venv's python), whatever kernels the machine has installed
    kernelspec.write_kernel_spec(jupyter / "kernels" / KERNEL, overrides={"display_name": "cfseg tests"})
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend turns figures into PNG outputs
    monkeypatch.setenv("CFSEG_NOTEBOOK_BUDGET", "tiny")
    monkeypatch.setenv("CFSEG_ROOT", str(ROOT))
    out = tmp_path / "out"
    monkeypatch.setenv("CFSEG_NOTEBOOK_OUT", str(out))
    assert os.environ.get("CFSEG_CACHE_DIR"), "conftest sets the text-embedding cache; the kernel inherits it"
    return out


@pytest.mark.parametrize("name", ["quickstart", "prototypes"])
def test_notebook_runs(name: str, notebook_env: Path, tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), "commit notebooks without outputs"
    work = tmp_path / "work"  # the kernel's working directory: the notebook must find the repo by CFSEG_ROOT
    work.mkdir()
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(work)}}).execute()
    elapsed = time.perf_counter() - t0
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert images, f"{name}.ipynb drew no figure"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "budget 'tiny'" in text
    assert list((notebook_env / name).rglob("*.ckpt")), "the notebook's checkpoints belong under CFSEG_NOTEBOOK_OUT"
    assert not list(work.iterdir()), f"{name}.ipynb wrote into its working directory: {list(work.iterdir())}"
    print(f"{name}.ipynb ran in {elapsed:.0f} s")
