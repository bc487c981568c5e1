"""Writing ``cfseg-segment``'s outputs safely: a lock per output folder, atomic replacement, and a manifest with each
file's sha256, so that a rerun never overwrites or deletes a file a reviewer edited (or that cfseg did not write).

Layout: one input's outputs directly in ``-o`` (:func:`write_flat`), or ``-o/<case>/`` per input of a folder run
(:func:`write_case_dir`, swapped in whole); each with its manifest ``.cfseg-segment.json`` (the input, the files,
their sha256 and the case's input checks). Outputs are NIfTI images (``<name>.nii.gz``) or DICOM datasets
(``<name>.dcm``: a DICOM-SEG or an RTSTRUCT, :mod:`cfseg.dicom_outputs`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import nibabel as nib
from pydicom.dataset import Dataset

from cfseg.segmentation import SegmentError, safe_name

LOCK_NAME = ".cfseg-segment.lock"
MANIFEST_NAME = ".cfseg-segment.json"
TMP_PREFIX = ".cfseg-tmp-"
OLD_PREFIX = ".cfseg-old-"


class OutputLock:
    """An exclusive, non-blocking ``fcntl.flock`` on ``<folder>/.cfseg-segment.lock``, removed on release.

    Raises:
        BlockingIOError: another process holds it.
        OSError: the folder is not writable.
    """

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino  # not unlinked by a finishing holder
            except BaseException:
                os.close(fd)
                raise
            if same:
                self.fd = fd
                return self
            os.close(fd)

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(out: Path) -> None:
    """Remove the temporary and replaced case folders a killed run left in ``out`` (call it holding the lock)."""
    for leftover in out.iterdir():
        if leftover.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            _remove(leftover)


def _fresh_dir(parent: Path) -> Path:
    """A temporary directory inside ``parent`` with the permissions of a normally created one."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=TMP_PREFIX))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def output_names(images: dict[str, nib.Nifti1Image | Dataset], labels: dict[str, str] | None) -> list[str]:
    """The file names :func:`_write_outputs` gives ``images`` (and ``labels.json``), in order: ``<name>.nii.gz``
    for a NIfTI image, ``<name>.dcm`` for a DICOM dataset (a DICOM-SEG or RTSTRUCT)."""
    names = [f"{safe_name(n)}{'.dcm' if isinstance(img, Dataset) else '.nii.gz'}" for n, img in images.items()]
    if len(set(names)) != len(names):
        raise SegmentError(f"two outputs would share a file name: {sorted(images)}")
    return [*names, "labels.json"] if labels is not None else names


def _write_outputs(folder: Path, images: dict[str, nib.Nifti1Image], labels: dict[str, str] | None,
                   rename: dict[str, str] | None = None) -> list[str]:
    """Write the outputs into ``folder`` under :func:`output_names` (``rename`` maps some of them to other names);
    returns the names written."""
    rename = rename or {}
    names = output_names(images, labels)
    for name, img in zip(names, images.values(), strict=False):
        if isinstance(img, Dataset):
            img.save_as(str(folder / rename.get(name, name)), enforce_file_format=True)
        else:
            nib.save(img, str(folder / rename.get(name, name)))
    if labels is not None:
        (folder / rename.get("labels.json", "labels.json")).write_text(json.dumps(labels, indent=2))
    return [rename.get(n, n) for n in names]


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, in hex (what the manifest records of every file cfseg-segment writes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class EditedFilesError(SegmentError):
    """Files cfseg-segment would replace or delete were changed since it wrote them (or were never its own)."""


def _read_manifest(path: Path) -> dict[str, set[str]]:
    """File name -> the sha256 values a file written by an earlier run may have (empty: none recorded, as in a
    manifest of a cfseg before hashes; such a file counts as changed). Only plain output names are kept."""
    try:
        data = json.loads(path.read_text())
        files, hashes = data.get("files", []), data.get("sha256", {})
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(files, list):
        return {}
    if not isinstance(hashes, dict):
        hashes = {}
    out: dict[str, set[str]] = {}
    for f in files:
        if isinstance(f, str) and safe_name(f) == f and f.endswith((".nii.gz", ".json", ".dcm")):
            h = hashes.get(f)
            h = [h] if isinstance(h, str) else h if isinstance(h, list) else []
            out[f] = {x for x in h if isinstance(x, str)}
    return out


def _unchanged(folder: Path, name: str, recorded: dict[str, set[str]]) -> bool:
    """Whether ``folder/name`` is a plain file an earlier run recorded, with the content it recorded."""
    p = folder / name
    return (name in recorded and p.is_file() and not p.is_symlink()
            and file_sha256(p) in recorded[name])


def _beside(name: str, avoid: set[str], folder: Path, replaceable: set[str]) -> str:
    """``labels.nii.gz`` -> ``labels.new.nii.gz`` (``labels.new2.nii.gz``, ...): a name for a new output whose
    usual name is held by a kept file; never one in ``avoid`` nor an existing file outside ``replaceable``."""
    suffix = next((s for s in (".nii.gz", ".json", ".dcm") if name.endswith(s)), "")
    stem = name[: len(name) - len(suffix)]
    k = 1
    while True:
        alt = f"{stem}.new{k if k > 1 else ''}{suffix}"
        p = folder / alt
        if alt not in avoid and (alt in replaceable or not (p.exists() or p.is_symlink())):
            return alt
        k += 1


def _refusal(folder: Path, changed: list[str], names: list[str], recorded: dict[str, set[str]]) -> EditedFilesError:
    them = "it" if len(changed) == 1 else "them"
    clash = next((n for n in names if n in changed), None)
    example = "" if clash is None else \
        f" (e.g. {_beside(clash, set(names) | set(changed), folder, set(recorded) - set(changed))})"
    return EditedFilesError(
        f"{folder}: {', '.join(changed)} {'differs' if them == 'it' else 'differ'} from what cfseg-segment wrote "
        f"(edited by a reviewer, or not written by it): nothing was written or deleted; move {them} away, choose "
        f"another -o, or rerun with --keep-edited to keep {them} and write the new outputs beside {them}{example}")


def _write_in_place(folder: Path, source: Path, images: dict[str, nib.Nifti1Image], labels: dict[str, str] | None,
                    recorded: dict[str, set[str]], changed: list[str],
                    checks: dict[str, Any] | None = None) -> list[str]:
    """Write the outputs into ``folder`` (each replaced atomically), new names for those whose usual name a file
    in ``changed`` holds, then remove the recorded files this run does not write (never one in ``changed``)."""
    names = output_names(images, labels)
    kept = set(changed)
    replaceable = {n for n in recorded if n not in kept}
    rename: dict[str, str] = {}
    for n in names:
        if n in kept:
            rename[n] = _beside(n, set(names) | set(rename.values()) | kept, folder, replaceable)
    tmp = _fresh_dir(folder)
    try:
        new = _write_outputs(tmp, images, labels, rename)
        hashes = {n: file_sha256(tmp / n) for n in new}
        manifest = folder / MANIFEST_NAME
        superset = {n: sorted(v) for n, v in recorded.items() if n in replaceable}  # crash-safe: old or new content
        for n, h in hashes.items():
            superset[n] = sorted({*superset.get(n, []), h})
        _write_json(manifest, {"input": str(source), "files": sorted(superset), "sha256": superset})
        for name in new:
            os.replace(tmp / name, folder / name)
        for name in sorted(replaceable - set(new)):
            if _unchanged(folder, name, recorded):  # checked again: never delete what changed meanwhile
                (folder / name).unlink(missing_ok=True)
        _write_json(manifest, {"input": str(source), "files": new, "sha256": hashes, **_checks(checks)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    notes = [f"{folder / n}: differs from what cfseg-segment wrote, kept as it is (--keep-edited); the new output "
             f"is {folder / rename[n]}" for n in names if n in rename]
    notes += [f"{folder / n}: differs from what cfseg-segment wrote, kept as it is (--keep-edited)"
              for n in changed if n not in rename and n in recorded]
    return notes


def write_case_dir(out: Path, case: str, images: dict[str, nib.Nifti1Image], labels: dict[str, str] | None,
                   source: Path | None = None, keep_edited: bool = False,
                   checks: dict[str, Any] | None = None) -> list[str]:
    """Write a case's outputs as ``out/<case>/``, replacing an earlier one whole (never a mix of two runs), with
    its manifest (``<case>/.cfseg-segment.json``: file names and sha256).

    An earlier case folder holding anything but the unchanged files its manifest lists (a reviewer's edit, a file
    cfseg did not write) is not replaced: :class:`EditedFilesError` naming them, or with ``keep_edited`` the new
    outputs are written into it in place, beside the kept files (:func:`write_flat`'s rules).

    Returns:
        one line per kept file (empty when nothing was kept).
    """
    dest = out / case
    source = Path(source) if source is not None else dest
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise EditedFilesError(f"{dest}: exists and is not a case folder cfseg-segment wrote; nothing was written; "
                               f"move it away or choose another -o")
    if dest.exists():
        recorded = _read_manifest(dest / MANIFEST_NAME)
        changed = sorted(p.name for p in dest.iterdir()
                         if p.name != MANIFEST_NAME and not _unchanged(dest, p.name, recorded))
        if changed:
            if not keep_edited:
                raise _refusal(dest, changed, output_names(images, labels), recorded)
            return _write_in_place(dest, source, images, labels, recorded, changed, checks)
    tmp = _fresh_dir(out)
    try:
        new = _write_outputs(tmp, images, labels)
        _write_json(tmp / MANIFEST_NAME, {"input": str(source), "files": new,
                                          "sha256": {n: file_sha256(tmp / n) for n in new}, **_checks(checks)})
        old = None
        if dest.exists():
            old = out / f"{OLD_PREFIX}{uuid.uuid4().hex}"
            os.rename(dest, old)
        os.rename(tmp, dest)
        if old is not None:
            _remove(old)
        return []
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _checks(checks: dict[str, Any] | None) -> dict[str, Any]:
    """What a manifest records of a case's input checks (:func:`segment`'s ``report``)."""
    return {"checks": dict(checks)} if checks else {}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}.json")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def write_flat(out: Path, source: Path, images: dict[str, nib.Nifti1Image], labels: dict[str, str] | None,
               keep_edited: bool = False, checks: dict[str, Any] | None = None) -> list[str]:
    """Write one input's outputs directly into ``out`` (each file replaced atomically), then remove the files the
    previous single-file run wrote there that this one does not (tracked, with their sha256, in
    ``out/.cfseg-segment.json``).

    A file this run would replace or remove whose content is not what an earlier run recorded (a reviewer edited
    it, or cfseg did not write it) is never touched: :class:`EditedFilesError` naming it before anything is
    written, or with ``keep_edited`` it is kept and the new output goes beside it (``labels.new.nii.gz``).

    Returns:
        one line per kept file (empty when nothing was kept).
    """
    recorded = _read_manifest(out / MANIFEST_NAME)
    names = output_names(images, labels)
    changed = sorted(n for n in set(recorded) | set(names)
                     if ((out / n).exists() or (out / n).is_symlink()) and not _unchanged(out, n, recorded))
    if changed and not keep_edited:
        raise _refusal(out, changed, names, recorded)
    return _write_in_place(out, source, images, labels, recorded, changed, checks)
