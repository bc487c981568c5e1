"""One LightningDataModule over several partially labelled datasets, remapped into one class list by name.

Every training sample is a dict:
    ``image``: float32 [C, *patch]; ``label``: uint8 [1, *patch] in global class indices (0 = background);
    ``annotated``: bool [K+1], which global classes were annotated for this case (index 0, background, is
    always True for labelled cases); ``dataset``, ``domain``, ``case_id``: str tags.
After collation the tensors gain a batch dimension and the tags become lists.

Splits are deterministic: a case's split depends only on the seed, the dataset name and the sorted case ids
(or on a committed split file), never on the order datasets are listed in.

Random crops and augmentation are seeded too (MONAI's random transforms keep their own numpy RandomState,
which ``seed_everything`` does not touch): when a training DataLoader is created, its transforms and its shuffling
generator are seeded from ``torch.initial_seed()`` (set by ``seed_everything``/``seed_everything: N``), and each
DataLoader worker reseeds its copy of the transforms from its own worker seed, so workers differ from each other
and a run repeats exactly. What still varies between runs with the same seed: the number of CPU threads (float
reductions split differently) and non-deterministic GPU kernels.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import lightning as L
import nibabel as nib
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from monai.data import CacheDataset, Dataset, PersistentDataset, list_data_collate
from torch.utils.data import ConcatDataset, DataLoader

from cfseg.checkpoint import load_error_message
from cfseg.data.formats import CaseRecord, DatasetError, DatasetInfo, ct_offset_problem, read_dataset
from cfseg.data.transforms import (
    CT_WINDOW,
    CheckedCompose,
    Preprocessing,
    augment_level,
    build_transforms,
    deterministic_transforms,
    hierarchical_transforms,
    make_label_lut,
)
from cfseg.distributed import world_size
from cfseg.vocab import Vocabulary, canonical_name, unknown_class_error

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class _Failed:
    """A cache item whose deterministic transforms raised (carried back to the main thread)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class CheckedCacheDataset(CacheDataset):
    """A :class:`monai.data.CacheDataset` whose cache fill raises a case's error cleanly in the calling thread.

    MONAI fills the cache with ``ThreadPool.imap``: the first exception leaves the ``with ThreadPool`` block at
    once, whose ``terminate()`` does not wait for the threads still transforming other cases (inside torch ops,
    with the GIL released). The error then ends the program while those daemon threads run; when one of them
    comes back from a torch op and asks for the GIL during interpreter shutdown, CPython ends the thread with
    ``pthread_exit``, whose forced unwinding through a C++ ``noexcept`` frame (pybind11's GIL guard) calls
    ``std::terminate``: "terminate called without an active exception", SIGABRT, exit 134, and the message is lost.

    Here each item's exception is caught in its worker thread; after the first one the remaining items are
    skipped, the pool is closed and *joined*, and only then is the first failing case's error (a
    :class:`~cfseg.data.formats.DatasetError` naming the file) raised, in the caller's thread.
    """

    def _fill_cache(self, indices=None) -> list:
        if self.cache_num <= 0:
            return []
        if indices is None:
            indices = list(range(self.cache_num))
        failed = threading.Event()

        def load(i: int):
            if failed.is_set():
                return None
            try:
                return self._load_cache_item(i)
            except BaseException as e:  # noqa: BLE001 - re-raised below, in the caller's thread
                failed.set()
                return _Failed(e)

        pool = ThreadPool(self.num_workers)
        try:
            results = pool.map(load, indices, chunksize=1)
        finally:
            failed.set()  # an interrupt in this thread: start no more items
            pool.close()
            pool.join()  # no thread outlives the fill
        errors = [r.error for r in results if isinstance(r, _Failed)]
        if errors:
            raise errors[0]
        return results


def derive_seed(*keys: int) -> int:
    """A 32-bit seed mixed from integers (any size) with numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(k) % 2**128 for k in keys]).generate_state(1)[0])


def seed_transforms(dataset, seed: int) -> None:
    """Seed the random transforms of every part of a (Concat)Dataset, each part from its own derived seed."""
    parts = getattr(dataset, "datasets", [dataset])
    seen: set[int] = set()
    for i, part in enumerate(parts):
        tf = getattr(part, "transform", None)
        if id(part) in seen or not hasattr(tf, "set_random_state"):
            continue
        seen.add(id(part))
        tf.set_random_state(seed=derive_seed(seed, i))


def _rank() -> int:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: reseed this worker's copy of the MONAI transforms from its worker seed.

    ``worker_info.seed`` is the loader's base seed (drawn from its seeded generator) + ``worker_id``, so workers
    differ from each other and repeat across runs (cf. :func:`monai.data.utils.worker_init_fn`). numpy/random
    are seeded as Lightning's own worker init does with ``seed_everything(workers=True)``.
    """
    from lightning.fabric.utilities.seed import pl_worker_init_function

    info = torch.utils.data.get_worker_info()
    pl_worker_init_function(worker_id)
    if info is not None:
        seed_transforms(info.dataset, derive_seed(info.seed, _rank()))


SAMPLINGS = ("cases", "hierarchical")


class HierarchicalSampler(torch.utils.data.Sampler):
    """Draws ``(dataset, case, class)`` triples: a dataset uniformly, a class it annotates, a case annotating it.

    Modelled on the sampling of Versatile (Chen et al., CVPR 2024, "Versatile medical image segmentation learned
    from multi-source datasets via model self-disambiguation"): each draw picks one of the datasets with equal
    probability (a small dataset is seen as often as a large one), then one of the foreground classes that
    dataset annotates with equal probability, then one of its cases that annotates that class, uniformly; the
    patch is then centred on that class (:class:`cfseg.data.transforms.ChosenClassCropd`). With a single dataset
    this is class-balanced cropping over its annotated classes, each case weighted by how many classes it adds.

    Args:
        groups: per dataset, ``{global class index: [indices of the dataset's training items annotating it]}``
            (datasets without any annotated class are left out by the caller).
        num_samples: draws per epoch (pass).
        generator: the random stream (the training loader's, seeded from the global seed).
    """

    def __init__(self, groups: Sequence[dict[int, list[int]]], num_samples: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.groups = [{int(k): list(v) for k, v in g.items() if v} for g in groups]
        if not self.groups or any(not g for g in self.groups):
            raise ValueError("hierarchical sampling needs at least one dataset and, in every dataset, one class "
                             f"annotated in a training case; got {[sorted(g) for g in self.groups]}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.generator = generator

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        g = self.generator
        classes = [sorted(grp) for grp in self.groups]
        for _ in range(self.num_samples):
            d = int(torch.randint(len(self.groups), (), generator=g))
            k = classes[d][int(torch.randint(len(classes[d]), (), generator=g))]
            cases = self.groups[d][k]
            yield d, cases[int(torch.randint(len(cases), (), generator=g))], k


class HierarchicalDataset(torch.utils.data.Dataset):
    """Training items keyed by ``(dataset, case, class)`` (:class:`HierarchicalSampler`'s draws).

    ``parts[d][i]`` is case ``i`` of dataset ``d`` after its deterministic (cached) transforms, padding and
    per-class voxel indices; the chosen class is attached as ``crop_class`` and ``transform`` (the class-centred
    crop and augmentation) runs on a copy, so the cache is never modified.

    Args:
        parts: one dataset of cached items per labelled training dataset.
        groups: per part, ``{class: [item indices annotating it]}`` (see :class:`HierarchicalSampler`).
        transform: the random transforms (:func:`cfseg.data.transforms.hierarchical_transforms`' second list).
        names: the datasets' names (messages).
    """

    def __init__(self, parts: Sequence[Any], groups: Sequence[dict[int, list[int]]], transform: Any,
                 names: Sequence[str]) -> None:
        self.parts, self.groups, self.transform, self.names = list(parts), list(groups), transform, list(names)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        import copy

        if not (isinstance(key, tuple) and len(key) == 3):
            raise TypeError(f"HierarchicalDataset is indexed by (dataset, case, class) triples from "
                            f"HierarchicalSampler, got {key!r}")
        d, i, k = (int(v) for v in key)
        item = copy.deepcopy(self.parts[d][i])  # as CacheDataset's copy_cache: transforms never touch the cache
        item["crop_class"] = k
        return self.transform(item)

    def sampler(self, num_samples: int, generator: torch.Generator | None = None) -> HierarchicalSampler:
        """The sampler of this dataset's draws."""
        return HierarchicalSampler(self.groups, num_samples, generator)


@dataclass
class DatasetConfig:
    """One dataset of an experiment (a YAML entry under ``data.datasets``).

    Attributes:
        path: folder holding ``dataset.json`` (nnU-Net v2 raw or MSD).
        name: tag carried by every sample; default the folder name.
        format: ``"auto"``, ``"nnunet"`` or ``"msd"``.
        modality: ``"ct"`` or ``"mri"``; default from the channel name.
        domain: domain tag (for domain-incremental stages); default the modality.
        classes: if given, only these of the dataset's classes count as annotated (the others are treated
            as not annotated, as in a class-incremental stage that sees only its own classes).
        labeled: False for image-only entries (unlabelled images, e.g. for distillation).
        split_file: JSON ``{"train": [...], "val": [...], "test": [...]}`` of case ids; overrides fractions.
        val_fraction: fraction of cases for validation when no split file is given.
        test_fraction: fraction of cases held out for testing.
        max_cases: use only the first N cases of the shuffled order (quick experiments).
        val_only: the dataset contributes only its ``val`` split (never training or test cases) and adds no
            classes: its annotated classes must already be in the class list (the previous checkpoint's or
            another dataset's). An incremental stage lists earlier stages' validation cases this way, so the
            validation metrics score every class seen so far.
        train_fraction: use only this fraction of the dataset's training cases (rounded up, at least one), a
            deterministic subset chosen from the split seed: experience replay of an earlier stage keeps e.g.
            0.25 of its training cases (not rehearsal-free). Validation and test cases are unchanged; a smaller
            fraction's subset is contained in a larger one's (see :func:`train_subset`).
    """

    path: str
    name: str | None = None
    format: str = "auto"
    modality: str | None = None
    domain: str | None = None
    classes: list[str] | None = None
    labeled: bool = True
    split_file: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    max_cases: int | None = None
    val_only: bool = False
    train_fraction: float = 1.0

    def __post_init__(self) -> None:
        f = self.train_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"dataset {self.name or self.path!r}: train_fraction must be in (0, 1], got {f!r} "
                             "(e.g. 0.25 to replay a quarter of an earlier stage's training cases)")


@dataclass
class LoadedDataset:
    """A dataset read from disk together with its config and split."""

    config: DatasetConfig
    info: DatasetInfo
    split: dict[str, list[CaseRecord]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def domain(self) -> str:
        return self.config.domain or self.info.modality

    def annotated(self, case: CaseRecord) -> tuple[str, ...]:
        """Classes annotated in ``case``, restricted to the config's ``classes`` when given."""
        if self.config.classes is None:
            return case.annotated
        keep = {canonical_name(c) for c in self.config.classes}
        return tuple(c for c in case.annotated if c in keep)


def split_cases(
    cases: Sequence[CaseRecord],
    seed: int,
    dataset_name: str,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_file: str | Path | None = None,
) -> dict[str, list[CaseRecord]]:
    """Deterministic train/val/test split of one dataset's cases.

    With ``split_file``, the file decides (every listed id must exist; unlisted cases are unused). Otherwise
    the sorted case ids are permuted by a generator seeded with ``(seed, crc32(dataset_name))``; the first
    ``round(test_fraction * n)`` go to test, the next ``round(val_fraction * n)`` to val, the rest to train.
    """
    by_id = {c.case_id: c for c in cases}
    if split_file is not None:
        path = Path(split_file)
        try:
            spec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DatasetError(f"{path}: cannot read split file ({e})") from e
        out = {}
        for s in SPLITS:
            ids = spec.get(s, [])
            missing = [i for i in ids if i not in by_id]
            if missing:
                raise DatasetError(f"{path}: {s} lists cases not in {dataset_name!r}: {missing[:5]}")
            out[s] = [by_id[i] for i in ids]
        seen: set[str] = set()
        for s in SPLITS:
            dup = seen & set(spec.get(s, []))
            if dup:
                raise DatasetError(f"{path}: cases in two splits: {sorted(dup)[:5]}")
            seen |= set(spec.get(s, []))
        return out
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions val={val_fraction}, test={test_fraction}: each in [0, 1), sum < 1")
    ids = sorted(by_id)
    rng = np.random.default_rng([seed, zlib.crc32(dataset_name.encode())])
    order = [ids[i] for i in rng.permutation(len(ids))]
    n = len(order)
    n_test = int(round(test_fraction * n))
    n_val = int(round(val_fraction * n))
    if n - n_test - n_val < 1:
        n_val = max(0, n - n_test - 1)
        n_test = min(n_test, n - n_val - 1)
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return {"train": [by_id[i] for i in train], "val": [by_id[i] for i in val], "test": [by_id[i] for i in test]}


def train_subset(cases: Sequence[CaseRecord], fraction: float, seed: int, dataset_name: str) -> list[CaseRecord]:
    """A deterministic subset of ``ceil(fraction * n)`` (at least one) of ``n`` training cases, in their order.

    The sorted case ids are permuted by a generator seeded with ``(seed, crc32(dataset_name), 1)`` (a stream
    apart from :func:`split_cases`'s) and the first ones are kept, so the subset depends only on the seed, the
    dataset and the case ids, and a smaller fraction's subset is contained in a larger one's.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction!r}")
    n = len(cases)
    k = max(1, math.ceil(fraction * n - 1e-9))  # tolerance: 0.3 * 10 is 3.0000000000000004, not 4 cases
    if k >= n:
        return list(cases)
    ids = sorted(c.case_id for c in cases)
    rng = np.random.default_rng([seed, zlib.crc32(dataset_name.encode()), 1])
    keep = {ids[i] for i in rng.permutation(n)[:k]}
    return [c for c in cases if c.case_id in keep]


def checkpoint_classes(path: str | Path, ckpt: Any = None) -> list[str]:
    """Foreground class names stored in a cfseg checkpoint (read without executing pickled code).

    ``ckpt``: the checkpoint already loaded from ``path`` (then the file is not read again).
    """
    p = Path(path)
    if ckpt is None:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: checkpoint not found")
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for files that are not checkpoints
            raise ValueError(load_error_message(p, e)) from e
    try:
        return list(ckpt["cfseg"]["class_names"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{p}: not a cfseg checkpoint (no class names)") from e


class SegDataModule(L.LightningDataModule):
    """Several partially labelled datasets, one global class list.

    Args:
        datasets: the datasets (see :class:`DatasetConfig`).
        classes: the experiment's global foreground class list, in order. Default: the union of the datasets'
            (config-restricted) classes in the order the datasets list them.
        spacing: target voxel spacing (mm) after reorientation to ``orientation``.
        patch_size: training patch size in voxels.
        batch_size: training volumes per batch (each gives ``samples_per_volume`` patches).
        samples_per_volume: random patches per loaded training volume.
        crop: ``"class_balanced"``, ``"foreground"`` or ``"random"`` (see transforms.random_transforms).
        class_ratios: crop-centre ratios per global class (background first) for class-balanced crops, or
            ``"inverse_frequency"``: class c gets N / n_c (N labelled training cases, n_c of them annotating c;
            background 1), so an organ contoured in a third of the cases is chosen three times as often where
            it is annotated and every class is a crop centre about equally often over an epoch (see
            :meth:`crop_ratios`). Default: equal ratios within each case.
        sampling: how labelled training patches are drawn. ``"cases"`` (default): every training case once per
            pass, shuffled, patches by ``crop`` / ``class_ratios``. ``"hierarchical"``: Versatile's dataset ->
            class sampling (Chen et al., CVPR 2024; :class:`HierarchicalSampler`): a dataset uniformly, a foreground
            class it annotates uniformly, a case of it annotating that class, ``samples_per_volume`` patches
            centred on that class; ``crop`` and ``class_ratios`` are then unused for labelled data. A pass has as
            many draws as ``"cases"`` has items (training cases x ``train_repeats``). With one dataset (OpenKBP)
            it reduces to class-balanced crops over the annotated classes (no crops centred on background).
        augment: training augmentation, one of :data:`cfseg.data.transforms.AUGMENT_LEVELS`: ``"intensity"`` (the
            default; also ``true``), ``"none"`` (also ``false``), ``"spatial"`` (+ rotation and scaling) or
            ``"strong"`` (nnU-Net-style: + noise, blur, low resolution, gamma);
            :func:`cfseg.data.transforms.augmentation`.
        ct_window: HU window for CT datasets.
        orientation: axis codes (default RAS).
        cache: ``"memory"`` (MONAI CacheDataset), ``"disk"`` (PersistentDataset under ``cache_dir``) or
            ``"none"``.
        cache_dir: folder for the disk cache.
        num_workers: DataLoader workers.
        seed: split seed.
        train_repeats: how many times the training set is repeated per epoch (short datasets, fewer epochs).
        previous_checkpoint: in an incremental stage, the previous stage's checkpoint: its classes come first
            in the global class list (in their order), then this stage's new classes. Linked from
            ``model.previous_checkpoint`` by the CLI.
    """

    def __init__(
        self,
        datasets: list[DatasetConfig],
        classes: list[str] | None = None,
        spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
        patch_size: tuple[int, int, int] = (64, 64, 64),
        batch_size: int = 2,
        samples_per_volume: int = 2,
        crop: str = "class_balanced",
        class_ratios: list[float] | str | None = None,
        sampling: str = "cases",
        augment: bool | str = True,
        ct_window: tuple[float, float] = CT_WINDOW,
        orientation: str = "RAS",
        cache: str = "memory",
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
        train_repeats: int = 1,
        previous_checkpoint: str | None = None,
    ):
        super().__init__()
        if not datasets:
            raise ValueError("data.datasets is empty: list at least one dataset folder")
        if isinstance(class_ratios, str) and class_ratios != "inverse_frequency":
            raise ValueError(f"class_ratios must be a list of K+1 numbers or 'inverse_frequency', got {class_ratios!r}")
        augment_level(augment)  # a bad level fails here, not at the first training batch
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if cache not in ("memory", "disk", "none"):
            raise ValueError(f"cache must be 'memory', 'disk' or 'none', got {cache!r}")
        self.save_hyperparameters(ignore=["datasets"])
        self.dataset_configs = [d if isinstance(d, DatasetConfig) else DatasetConfig(**d) for d in datasets]
        self.hparams["datasets"] = [vars(d) for d in self.dataset_configs]
        self.datasets = [self._load(cfg) for cfg in self.dataset_configs]
        names = [ds.name for ds in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"two datasets share a name: {names}; give each a distinct `name`")
        dataset_classes = [
            [c for c in ds.info.classes if ds.config.classes is None or c in
             {canonical_name(x) for x in ds.config.classes}]
            for ds in self.datasets if ds.config.labeled and not ds.config.val_only
        ]
        old = checkpoint_classes(previous_checkpoint) if previous_checkpoint else []
        if classes is not None:
            self.vocab = Vocabulary.union([old, classes])
        else:
            self.vocab = Vocabulary.union([old, *dataset_classes])
        for ds in self.datasets:
            unknown = [c for c in ds.info.classes if c not in self.vocab]
            if ds.config.val_only:
                self._check_val_only(ds)
            elif unknown and ds.config.labeled and ds.config.classes is None:
                log.warning("%s: classes %s are not in the experiment's class list; their voxels count as "
                            "background", ds.name, unknown)
            if ds.config.classes is not None:
                for c in ds.config.classes:
                    if canonical_name(c) not in ds.info.labels:
                        raise unknown_class_error(c, ds.info.classes, f"classes of dataset {ds.name!r}")
        self._sets: dict[str, Any] = {}

    def _check_val_only(self, ds: LoadedDataset) -> None:
        """A validation-only dataset must be labelled and annotate only classes already in the class list."""
        if not ds.config.labeled:
            raise ValueError(f"dataset {ds.name!r}: val_only needs labels (labeled: false given); an image-only "
                             "entry has nothing to validate")
        annotated = [canonical_name(c) for c in ds.config.classes] if ds.config.classes is not None \
            else ds.info.classes
        new = [c for c in annotated if c not in self.vocab]
        if new:
            raise ValueError(f"dataset {ds.name!r} is val_only but annotates classes {new} that are not in the "
                             f"class list {self.vocab.classes}: a validation-only dataset adds no classes; restrict "
                             "its `classes` to the previous checkpoint's or this stage's classes")

    # ---- reading -------------------------------------------------------------------------------------
    def _load(self, cfg: DatasetConfig) -> LoadedDataset:
        info = read_dataset(cfg.path, cfg.format, cfg.modality, cfg.name, require_labels=cfg.labeled)
        cases = info.cases[: cfg.max_cases] if cfg.max_cases is not None else info.cases
        # the split key is the folder name, so a dataset splits the same under any tag (labelled or image-only)
        split = split_cases(cases, self.hparams.seed, Path(cfg.path).name, cfg.val_fraction, cfg.test_fraction,
                            cfg.split_file)
        if cfg.train_fraction < 1:
            split["train"] = train_subset(split["train"], cfg.train_fraction, self.hparams.seed, Path(cfg.path).name)
        return LoadedDataset(cfg, info, split)

    @property
    def class_names(self) -> list[str]:
        """Global foreground class names (linked to the model by the CLI)."""
        return self.vocab.classes

    @property
    def num_classes(self) -> int:
        """K + 1 (background included)."""
        return len(self.vocab)

    def preprocessing(self, modality: str) -> Preprocessing:
        h = self.hparams
        return Preprocessing(modality=modality, spacing=tuple(h.spacing), orientation=h.orientation,
                             ct_window=tuple(h.ct_window))

    @property
    def preprocessing_by_modality(self) -> dict[str, dict]:
        """Preprocessing per modality present, as plain dicts (stored in checkpoints)."""
        return {m: self.preprocessing(m).to_dict() for m in sorted({d.info.modality for d in self.datasets})}

    def annotated_mask(self, ds: LoadedDataset, case: CaseRecord) -> torch.Tensor:
        """bool [K+1]: which global classes are annotated in ``case`` (background True when labelled)."""
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        if case.label is None:
            return mask
        mask[0] = True
        for name in ds.annotated(case):
            if name in self.vocab:
                mask[self.vocab.index(name)] = True
        return mask

    def items(self, ds: LoadedDataset, split: str) -> list[dict[str, Any]]:
        """MONAI-style item dicts for one dataset's split."""
        gidx = {n: i for i, n in enumerate(self.vocab.names)}
        out = []
        if ds.config.val_only and split != "val":
            return out
        for case in ds.split.get(split, []):
            item: dict[str, Any] = {
                "image": [str(p) for p in case.images] if len(case.images) > 1 else str(case.images[0]),
                "annotated": self.annotated_mask(ds, case),
                "dataset": ds.name,
                "domain": ds.domain,
                "case_id": case.case_id,
            }
            if case.label is not None and ds.config.labeled:
                item["label"] = str(case.label)
                item["label_lut"] = make_label_lut(ds.info.labels, ds.annotated(case), gidx)
            out.append(item)
        return out

    def annotation_counts(self, split: str = "train") -> tuple[int, list[int]]:
        """(labelled cases N, [K+1] cases annotating each global class) over the labelled datasets' ``split``."""
        counts, n = [0] * self.num_classes, 0
        for ds in self.datasets:
            if not ds.config.labeled or (ds.config.val_only and split != "val"):
                continue
            for case in ds.split.get(split, []):
                if case.label is None:
                    continue
                n += 1
                for i, a in enumerate(self.annotated_mask(ds, case).tolist()):
                    counts[i] += int(a)
        return n, counts

    def crop_ratios(self) -> list[float] | None:
        """Crop-centre ratios [K+1] for class-balanced crops (None: equal within each case).

        ``"inverse_frequency"``: N / n_c for every class annotated in n_c > 0 of the N training cases, 0 for
        a class no training case annotates (it has no voxels to centre on), background 1. MONAI's
        ``RandCropByLabelClassesd`` renormalises over the classes present in each case.
        """
        r = self.hparams.class_ratios
        if r is None or not isinstance(r, str):
            if r is not None and len(r) != self.num_classes:
                raise ValueError(f"class_ratios has {len(r)} entries; the class list needs {self.num_classes} "
                                 f"(background + {self.class_names})")
            return None if r is None else [float(x) for x in r]
        n, counts = self.annotation_counts("train")
        return [1.0] + [n / c if c else 0.0 for c in counts[1:]]

    # ---- datasets ------------------------------------------------------------------------------------
    def _dataset(self, items: list[dict], transform, tag: str):
        h = self.hparams
        if h.cache == "memory":
            return CheckedCacheDataset(items, transform, cache_rate=1.0, num_workers=None, progress=False)
        if h.cache == "disk":
            cache_dir = Path(h.cache_dir or "results/cache") / tag
            cache_dir.mkdir(parents=True, exist_ok=True)
            return PersistentDataset(items, transform, cache_dir=cache_dir)
        return Dataset(items, transform)

    def split_dataset(self, split: str, labeled: bool = True):
        """The concatenated dataset of one split over all (labelled or image-only) datasets, or None."""
        key = f"{split}-{labeled}"
        if key in self._sets:
            return self._sets[key]
        h = self.hparams
        if split == "train" and labeled and h.get("sampling", "cases") == "hierarchical":
            self._sets[key] = self._hierarchical_dataset()
            return self._sets[key]
        parts = []
        for ds in self.datasets:
            if ds.config.labeled != labeled:
                continue
            items = self.items(ds, split)
            if not items:
                continue
            pre = self.preprocessing(ds.info.modality)
            tf = build_transforms(
                pre, train=(split == "train"), patch_size=h.patch_size, num_classes=self.num_classes,
                labeled=labeled, samples_per_volume=h.samples_per_volume, crop=h.crop,
                class_ratios=self.crop_ratios(), augment=h.augment,
            ) if split == "train" else build_transforms(pre, train=False, labeled=labeled)
            parts.append(self._dataset(items, tf, f"{ds.name}-{split}"))
        if split == "train" and h.train_repeats > 1:
            parts = parts * h.train_repeats
        self._sets[key] = ConcatDataset(parts) if parts else None
        return self._sets[key]

    def _hierarchical_dataset(self) -> HierarchicalDataset | None:
        """The labelled training datasets for hierarchical sampling (None when there are no training cases)."""
        h = self.hparams
        cached, rand = hierarchical_transforms(h.patch_size, self.num_classes, h.samples_per_volume, h.augment)
        parts, groups, names = [], [], []
        for ds in self.datasets:
            if not ds.config.labeled:
                continue
            items = self.items(ds, "train")
            group: dict[int, list[int]] = {}
            for i, item in enumerate(items):
                for k in item["annotated"].nonzero().flatten().tolist():
                    if k > 0:
                        group.setdefault(int(k), []).append(i)
            if not group:
                if items:
                    log.warning("%s: no training case annotates a class of the class list; hierarchical sampling "
                                "leaves it out", ds.name)
                continue
            tf = CheckedCompose(deterministic_transforms(self.preprocessing(ds.info.modality)) + cached)
            parts.append(self._dataset(items, tf, f"{ds.name}-train-hierarchical"))
            groups.append(group)
            names.append(ds.name)
        return HierarchicalDataset(parts, groups, CheckedCompose(rand), names) if parts else None

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS) if stage else SPLITS:
            self.split_dataset(split)
        if stage == "fit":
            self.warn_ct_offsets()

    def warn_ct_offsets(self) -> list[str]:
        """Warn (and return the lines) for CT datasets whose first training image is not in Hounsfield units
        (:func:`cfseg.data.formats.ct_offset_problem`: a CT stored without its HU offset trains without error but
        learns intensities no other CT has)."""
        lines = []
        for d in self.datasets:
            items = self.items(d, "train") if d.info.modality == "ct" else []
            if not items:
                continue
            path = items[0]["image"]
            path = path[0] if isinstance(path, list) else path  # the first channel is the CT
            problem = ct_offset_problem(np.asarray(nib.load(str(path)).dataobj))
            if problem:
                lines.append(f"dataset {d.name}: {path}: {problem}")
                warnings.warn(lines[-1], stacklevel=2)
        return lines

    def _loader(self, split: str, shuffle: bool, batch_size: int, labeled: bool = True) -> DataLoader:
        ds = self.split_dataset(split, labeled)
        if ds is None:
            raise DatasetError(
                f"no {split} cases in any dataset ({', '.join(d.name for d in self.datasets)}); "
                "adjust val_fraction/test_fraction or the split file"
            )
        kwargs: dict[str, Any] = {}
        if split == "train":
            # MONAI's random transforms ignore seed_everything: seed them (and the shuffling) from the global seed
            seed = derive_seed(torch.initial_seed(), int(labeled), _rank())
            seed_transforms(ds, seed)
            kwargs = {"generator": torch.Generator().manual_seed(seed), "worker_init_fn": seed_worker}
            if isinstance(ds, HierarchicalDataset):  # draws from the sampler: as many per pass as "cases" gives
                n = sum(len(self.items(d, "train")) for d in self.datasets if d.config.labeled)
                kwargs["sampler"] = ds.sampler(n * self.hparams.train_repeats, kwargs.pop("generator"))
                shuffle = False
        elif world_size() > 1:  # evaluation under DDP: each case on one process, none repeated to even the shares
            kwargs["sampler"] = UnrepeatedDistributedSampler(ds, shuffle=False)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.hparams.num_workers,
                          collate_fn=list_data_collate, persistent_workers=self.hparams.num_workers > 0, **kwargs)

    def train_dataloader(self):
        """Labelled patches; with image-only entries, a CombinedLoader ``{"labeled", "unlabeled"}``."""
        labeled = self._loader("train", True, self.hparams.batch_size)
        unlabeled = self.unlabeled_dataloader()
        if unlabeled is None:
            return labeled
        from lightning.pytorch.utilities import CombinedLoader

        return CombinedLoader({"labeled": labeled, "unlabeled": unlabeled}, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader | list:
        """Whole validation volumes; an empty list (validation skipped, with a warning) when there are none."""
        if self.split_dataset("val") is None:
            log.warning("no validation cases (val_fraction too small for these datasets): validation is skipped")
            return []
        return self._loader("val", False, 1)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, 1)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False, 1)

    def unlabeled_dataloader(self) -> DataLoader | None:
        """Image-only training entries (for distillation), or None when there are none."""
        if self.split_dataset("train", labeled=False) is None:
            return None
        return self._loader("train", True, self.hparams.batch_size, labeled=False)

    # ---- reporting -----------------------------------------------------------------------------------
    def summary(self) -> str:
        """A plain-text table: cases per split, classes, and how many cases annotate each class."""
        lines = [f"global classes ({len(self.class_names)}): {', '.join(self.class_names)}"]
        for ds in self.datasets:
            splits = ("val",) if ds.config.val_only else SPLITS
            n = {s: len(ds.split.get(s, [])) if s in splits else 0 for s in SPLITS}
            used = [c for s in splits for c in ds.split.get(s, [])]
            lines.append(
                f"\n{ds.name}  [{ds.info.format}, {ds.info.modality}, domain={ds.domain}]  {len(used)} "
                f"cases (train {n['train']}, val {n['val']}, test {n['test']})"
                + ("" if ds.config.labeled else "  image-only") + ("  validation-only" if ds.config.val_only else "")
            )
            if not ds.config.labeled:
                continue
            counts = {c: 0 for c in ds.info.classes}
            for case in used:
                for c in ds.annotated(case):
                    counts[c] += 1
            for c in ds.info.classes:
                gi = self.vocab.index(c) if c in self.vocab else "-"
                lines.append(f"  {c:<24} value {ds.info.labels[c]:>3} -> global {gi!s:>3}   annotated in "
                             f"{counts[c]:>3}/{len(used)} cases")
        return "\n".join(lines)
