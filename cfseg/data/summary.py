"""What the data layer reads from dataset folders, and a full integrity check (``cfseg-data-summary``,
:mod:`cfseg.apps.data_summary`).

:func:`check_datasets` reads every voxel of every case, like nnU-Net's dataset integrity check, and reports every
problem it finds, one line each naming the file:

- every image and label file exists and loads completely (no truncated, corrupt or empty file);
- images are 3D (one file per channel), affines are finite and non-singular;
- the channels and the label of a case agree in shape and affine (spacing, origin, direction);
- images have no NaN/infinite intensities; label values are integers declared in ``dataset.json``;
- a CT channel is in Hounsfield units (air near -1000: :func:`cfseg.data.formats.ct_offset_problem`);
- ``partial_labels.json`` names only cases of the dataset and classes declared in ``dataset.json``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np

from cfseg.data.formats import (
    CaseRecord,
    DatasetError,
    affine_problem,
    affines_match,
    ct_offset_problem,
    describe_affine_difference,
    dtype_problem,
    modality_from_channel,
    read_dataset,
    read_error_message,
)


@dataclass
class CheckReport:
    """What ``--check`` found: problems (one line each, naming the file) and what it read."""

    problems: list[str]
    datasets: int = 0
    cases: int = 0
    files: int = 0
    voxels: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def one_line(msg: str) -> str:
    """``msg`` as one line: its non-blank lines joined by ``; ``."""
    return "; ".join(line.strip() for line in str(msg).splitlines() if line.strip())


def _read_volume(path: Path, problems: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """All voxels and the affine of one NIfTI file, or None (with the problem appended)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        problem = dtype_problem(img.get_data_dtype())
        if problem:
            problems.append(f"{path}: {problem}")
            return None
        arr = np.asarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - nibabel/gzip/zlib raise many types; each becomes one line
        problems.append(read_error_message(path, e))
        return None
    affine = np.asarray(img.affine, dtype=np.float64)
    bad = False
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        problems.append(f"{path}: expected a 3D volume, got shape {tuple(arr.shape)} (one file per channel)")
        bad = True
    problem = affine_problem(affine)
    if problem:
        problems.append(f"{path}: {problem}")
        bad = True
    return None if bad else (arr, affine)


def check_case(case: CaseRecord, labels: dict[str, int],
               channels: Sequence[str] = ()) -> tuple[list[str], int, int]:
    """Read every voxel of one case and check it (see the module docstring); ``channels``: the dataset's channel
    modalities in order (``"ct"`` channels are checked for Hounsfield units).

    Returns:
        (problems, files read, voxels read).
    """
    problems: list[str] = []
    ref: tuple[Path, tuple, np.ndarray] | None = None
    n_files = n_vox = 0
    declared = sorted(labels.values())
    for path in (*case.images, *([case.label] if case.label is not None else [])):
        vol = _read_volume(path, problems)
        n_files += 1
        if vol is None:
            continue
        arr, affine = vol
        n_vox += arr.size
        is_label = path == case.label
        if not is_label and np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            n = int((~np.isfinite(arr)).sum())
            problems.append(f"{path}: {n} NaN/infinite intensities (fix or mask them before training)")
        channel = case.images.index(path) if not is_label else -1
        if not is_label and channel < len(channels) and channels[channel] == "ct":
            offset = ct_offset_problem(arr)
            if offset:
                problems.append(f"{path}: {offset}")
        if is_label:
            values = np.unique(arr)
            if np.issubdtype(values.dtype, np.floating):
                odd = values[~np.isfinite(values) | (values != np.round(values))]
                if odd.size:
                    problems.append(f"{path}: label has non-integer values {odd[:5].tolist()} "
                                    "(save label maps as integers)")
                values = values[np.isfinite(values)]
            undeclared = [int(v) for v in values if v == int(v) and int(v) != 0 and int(v) not in declared]
            if undeclared:
                problems.append(f"{path}: label values {undeclared} are not declared in dataset.json "
                                f"(declared: {declared})")
        if ref is None:
            ref = (path, arr.shape, affine)
            continue
        if arr.shape != ref[1]:
            problems.append(f"{path}: shape {tuple(arr.shape)} does not match {ref[0].name} {tuple(ref[1])}")
        elif not affines_match(affine, ref[2]):
            problems.append(f"{path}: affine does not match {ref[0].name} "
                            f"({describe_affine_difference(affine, ref[2])})")
    return problems, n_files, n_vox


def _channel_modality(name: str) -> str:
    try:
        return modality_from_channel(name)
    except DatasetError:  # a channel of unknown modality: no modality-specific check
        return ""


def check_datasets(roots: list[str | Path], jobs: int | None = None) -> CheckReport:
    """Integrity check of dataset folders: every problem of every file (see the module docstring)."""
    report = CheckReport(problems=[])
    work: list[tuple[CaseRecord, dict[str, int], list[str]]] = []
    for root in roots:
        report.datasets += 1
        try:
            info = read_dataset(root, check_headers=False, problems=report.problems)
        except DatasetError as e:  # dataset.json itself: nothing more can be checked in this dataset
            report.problems.append(one_line(str(e)))
            continue
        channels = [info.modality, *(_channel_modality(c) for c in info.channel_names[1:])]
        work += [(case, info.labels, channels) for case in info.cases]
    report.cases = len(work)
    pool = ThreadPool(jobs or min(4, os.cpu_count() or 1))  # gzip inflation releases the GIL
    try:
        results = pool.starmap(check_case, work, chunksize=1)
    finally:
        pool.close()
        pool.join()
    for problems, n_files, n_vox in results:
        report.problems += problems
        report.files += n_files
        report.voxels += n_vox
    report.problems = [one_line(p) for p in report.problems]
    return report
