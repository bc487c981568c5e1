"""reports/: current.json is complete and traceable, and the README tables quote nothing that is not in it."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"
CURRENT = json.loads((REPORTS / "current.json").read_text())
FIELDS = ("mean", "per_seed", "config", "command", "commit", "source")
DOCS = (REPORTS / "README.md", ROOT / "docs" / "decisions.md", ROOT / "benchmarks" / "README.md")
SEPARATOR = re.compile(r"\|(\s*:?-+:?\s*\|)+")
DECIMAL = re.compile(r"(?<![\w.])-?\d+\.\d+(?![\w.])")


def _git_ok() -> bool:
    if shutil.which("git") is None:
        return False
    return subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ROOT, capture_output=True).returncode == 0


def test_every_entry_has_the_fields():
    assert CURRENT
    for key, e in CURRENT.items():
        assert re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+)+", key), key
        assert all(f in e for f in FIELDS), key
        assert isinstance(e["mean"], (int, float)) and math.isfinite(e["mean"]), key
        assert isinstance(e["per_seed"], dict), key
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in e["per_seed"].values()), key
        assert e["config"] and e["command"], key
        assert re.fullmatch(r"[0-9a-f]{7,40}", e["commit"]), key
        assert (ROOT / e["source"]).is_file(), key


@pytest.mark.skipif(not _git_ok(), reason="no git repository")
def test_every_commit_is_known_to_git():
    for commit in sorted({e["commit"] for e in CURRENT.values()}):
        r = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True)
        assert r.returncode == 0, f"git does not know commit {commit}"


def _table_numbers(text: str):
    """(row, number) for every decimal number in a table row (header and code spans left out)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if not line.startswith("|") or SEPARATOR.fullmatch(line):
            continue
        if i + 1 < len(lines) and SEPARATOR.fullmatch(lines[i + 1].strip()):
            continue  # header row
        for m in DECIMAL.finditer(re.sub(r"`[^`]*`", "", line)):
            yield line, m.group()


def test_every_number_in_a_readme_table_is_in_current_json():
    values = [v for e in CURRENT.values() for v in (e["mean"], *e["per_seed"].values())]
    quoted = list(_table_numbers((REPORTS / "README.md").read_text()))
    assert len(quoted) > 100
    missing = []
    for row, number in quoted:
        digits = len(number.split(".")[1])
        x = float(number)
        if not any(abs(v - x) <= 0.5 * 10 ** -digits + 1e-9 for v in values):
            missing.append(f"{number} in {row[:80]}")
    assert not missing, "\n".join(missing)


def test_documents_cite_existing_keys_and_paths():
    keys = set(CURRENT)
    for doc in DOCS:
        text = doc.read_text()
        for key in re.findall(r"`((?:demo|synthetic|openkbp|speed|online|router)\.[a-z0-9_.]+)`", text):
            key = key.rstrip(".")
            assert key in keys or any(k.startswith(key + ".") for k in keys), f"{doc.name}: unknown key {key}"
        for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" in link:
                continue
            target = (doc.parent / link).resolve()
            assert target.is_relative_to(ROOT) and target.exists(), f"{doc.name}: link {link}"
        assert "../shared" not in text


@pytest.mark.skipif(not _git_ok(), reason="no git repository")
def test_current_json_is_what_the_result_files_give():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reports_build", REPORTS / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.build() == CURRENT, "python reports/build.py to regenerate current.json"
