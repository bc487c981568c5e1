"""Routing accuracy of the analytic ridge router of strategy ``experts``: feature expansion and ridge strength.

The router (:class:`cfseg.continual.router.RidgeRouter`) is fitted, as in the protocol, from the features of the
frozen stage-0 network (:meth:`cfseg.module.CFSegModule.router_features`: per-channel mean and standard
deviation of the bottleneck convolution's output, before its instance norm) on *training patches* of every
stage, and it routes *whole volumes* (:meth:`cfseg.module.CFSegModule.route`: non-overlapping ``roi_size``
windows, mean score). This script computes those features once per scenario and fits every router setting of the
grid on them:

* random_features ``0`` (the features as they are, ``phi = [x, 1]``), ``1024`` and ``4096`` (``relu(x R)``,
  projection seed ``--projection-seeds``); gamma in ``--gammas`` (default 0.01, 0.1, 1, 10). The protocol's
  default is random_features 0, gamma 1.

What is the same as in training:

* Statistics: per stage of the protocol YAML, the stage's labelled datasets (the stage's ``classes`` as the
  annotated set, as the protocol passes them) in a :class:`cfseg.data.datamodule.SegDataModule` with the base
  config's ``data`` settings (patch size, batch size, patches per volume, class-balanced crops, crop ratios,
  augmentation) and the checkpoint's preprocessing; its seeded training loader (``torch.manual_seed(--seed)``) gives
  ``--batches`` batches (passes repeat, as ``collect_expert_router_statistics``); one expert per stage.
  The crops are not the very crops of a training run (there, the loader has already been iterated by training).
* Volumes: the validation and test cases of every stage's datasets (split seed of the YAML; split files), loaded
  as :mod:`cfseg.evaluation` does (``build_transforms(dm.preprocessing(modality), train=False)``), windows as
  :meth:`~cfseg.module.CFSegModule.route` takes them (checked: the script calls ``route`` itself on one volume per
  scenario and asserts the same expert).

Decision rules. A stage's domain is its datasets' ``domain`` (default: their modality). Accuracy is the fraction
of volumes routed to their own domain.

* ``domain``: a router over domains (one-hot domain targets). Because ``W = (G + gamma I)^-1 Q`` is linear in ``Q``
  and the per-stage ``G`` terms add up, its scores are the per-expert scores summed over each domain's experts; the
  script computes it so (and asserts the equality against a router fitted on domain targets).
* ``expert`` (only where a domain has several stages): the protocol's rule, top-1 expert among the stages, correct
  when that expert's domain is the volume's.

Selection: the setting with the highest validation accuracy (``domain`` rule); ties go to the larger mean
validation margin (score of the own domain minus the best other domain, averaged over validation volumes).

Scenarios (``--scenarios``):

* ``synthetic``: ``configs/incremental/synthetic.yaml`` (stages: CT Dataset011, CT Dataset012, MRI Dataset013),
  checkpoint ``results/synth_check/seed0/runs/stage0/final.ckpt``. Domains ct (2 experts) and mri.
* ``openkbp``: ``configs/openkbp/domain.yaml`` (stage 0: the original scanner, split_stage0.json; stage 1: the
  stage-1 cases through ``SCANNER_B``, split_scanner_b.json, domain ``ct_scanner_b``), checkpoint
  ``results/openkbp/incremental/seed0/runs/stage0/final.ckpt`` (the stage 0 that domain.yaml reuses).

Example (writes ``benchmarks/router_ablation.json`` and ``.md``)::

    OMP_NUM_THREADS=1 python benchmarks/router_ablation.py --out benchmarks/router_ablation
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

SCENARIOS = {
    "synthetic": {"protocol": "configs/incremental/synthetic.yaml",
                  "checkpoint": "results/synth_check/seed0/runs/stage0/final.ckpt"},
    "openkbp": {"protocol": "configs/openkbp/domain.yaml",
                "checkpoint": "results/openkbp/incremental/seed0/runs/stage0/final.ckpt"},
}
EXPANSIONS = (0, 1024, 4096)
GAMMAS = (0.01, 0.1, 1.0, 10.0)
DEFAULT_SETTING = (0, 1.0)  # model.router_random_features, model.router_gamma


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage_plan(protocol: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The protocol's split seed, base ``data`` settings and stages (``name``, labelled dataset entries)."""
    import yaml

    from cfseg.experiments.protocol import load_protocol, stage_datasets

    spec = load_protocol(protocol)
    base = yaml.safe_load(Path(spec["base_config"]).read_text()) or {}
    data = dict(base.get("data") or {})
    data["split_seed"] = spec.get("split_seed", 0)
    stages = [{"name": st["name"], "datasets": stage_datasets(st)} for st in spec["stages"]]
    return data, stages


def _datamodule(module, entries: list[dict[str, Any]], data: dict[str, Any], train: bool):
    from cfseg.data.datamodule import DatasetConfig, SegDataModule

    pre = next(iter(module.preprocessing.values()))
    configs = [DatasetConfig(**e) for e in entries]
    kwargs: dict[str, Any] = {"spacing": tuple(pre["spacing"]), "ct_window": tuple(pre.get("ct_window")),
                              "orientation": pre.get("orientation", "RAS"), "cache": "none", "num_workers": 0,
                              "seed": int(data["split_seed"])}
    if train:
        for k in ("patch_size", "batch_size", "samples_per_volume", "crop", "class_ratios", "augment"):
            if k in data:
                kwargs[k] = tuple(data[k]) if k == "patch_size" else data[k]
    return SegDataModule(configs, **kwargs)


def layer_features(module, x, layers: list[str]) -> dict[str, Any]:
    """``{layer pattern: router features [B, 2C]}`` of images ``x`` (``router_features`` with each layer)."""
    from contextlib import suppress

    saved = module.statistics.router_layer
    out = {}
    try:
        for layer in layers:
            module.statistics.router_layer = layer
            out[layer] = module.router_features(x).cpu()
    finally:
        with suppress(Exception):
            module.statistics.router_layer = saved
    return out


def _cat(parts: list[dict[str, Any]], layers: list[str]) -> dict[str, Any]:
    import torch

    return {layer: torch.cat([p[layer] for p in parts]) for layer in layers}


def patch_features(module, entries: list[dict[str, Any]], data: dict[str, Any], batches: int, seed: int,
                   layers: list[str]) -> tuple[dict[str, Any], int]:
    """Router features ``{layer: [N, 2C]}`` of ``batches`` training batches of one stage (as
    ``collect_expert_router_statistics``: passes over the seeded loader repeat until enough batches), and
    ``"rows_per_batch"``; the first ``n`` batches are those that ``batches=n`` would give."""
    import torch

    dm = _datamodule(module, entries, data, train=True)
    torch.manual_seed(seed)  # the loader seeds its crops and shuffling from torch.initial_seed()
    loader = dm.train_dataloader()
    feats, seen, last = [], 0, -1
    while last != seen < batches:
        last = seen
        for batch in loader:
            if isinstance(batch, dict) and "labeled" in batch:
                batch = batch["labeled"]
            feats.append(layer_features(module, batch["image"].as_subclass(torch.Tensor).float(), layers))
            seen += 1
            if seen >= batches:
                break
    rows = [int(f[layers[0]].shape[0]) for f in feats]  # rows of each batch, so a prefix is the first n batches
    return {**_cat(feats, layers), "rows_per_batch": rows}, seen


def window_features(module, image, layers: list[str]) -> dict[str, Any]:
    """Features ``{layer: [N_windows, 2C]}`` of one preprocessed volume ``[1, C, *S]``, windows exactly as
    ``route`` takes them (non-overlapping ``roi_size`` windows, the last one ending at the border)."""
    import torch
    from monai.data.utils import dense_patch_slices

    roi = [int(r) for r in module.hparams.roi_size]
    x = image[:1].as_subclass(torch.Tensor)
    pad = [max(0, r - n) for n, r in zip(x.shape[2:], roi, strict=True)]
    x = torch.nn.functional.pad(x, [p for q in reversed(pad) for p in (0, q)])
    return _cat([layer_features(module, x[(slice(None), slice(None), *sl)].float(), layers)
                 for sl in dense_patch_slices(tuple(x.shape[2:]), roi, roi)], layers)


def volume_features(module, entries: list[dict[str, Any]], data: dict[str, Any], split: str,
                    cap: int | None, layers: list[str]) -> list[dict[str, Any]]:
    """One stage's ``split`` volumes: ``{"case_id", "dataset", "shape", "feats": {layer: [N_windows, 2C]}}``
    each (the first one also keeps its ``image``)."""
    from cfseg.data.transforms import build_transforms

    dm = _datamodule(module, [{**e, "classes": None} for e in entries], data, train=False)
    out = []
    for ds in dm.datasets:
        transform = build_transforms(dm.preprocessing(ds.info.modality), train=False, labeled=False)
        for item in dm.items(ds, split):
            if cap is not None and len(out) >= cap:
                break
            vol = transform({"image": item["image"], "case_id": item["case_id"]})
            image = vol["image"][None]
            out.append({"case_id": item["case_id"], "dataset": ds.name, "shape": list(image.shape[2:]),
                        "image": image if not out else None, "feats": window_features(module, image, layers)})
    return out


def _domain_of(module, entries: list[dict[str, Any]], data: dict[str, Any]) -> str:
    dm = _datamodule(module, entries, data, train=False)
    domains = sorted({ds.domain for ds in dm.datasets})
    if len(domains) != 1:
        raise ValueError(f"a stage must have one domain, got {domains}")
    return domains[0]


def fit_router(train: list[Any], in_features: int, gamma: float, random_features: int, seed: int):
    """A router with one expert per stage, updated with each stage's patch features ``train[e]``."""
    from cfseg.continual.router import RidgeRouter

    router = RidgeRouter(in_features, gamma=gamma, random_features=random_features, seed=seed)
    for e, x in enumerate(train):
        router.update(x, e)
    return router


def _membership(expert_domain: list[int], n_domains: int) -> Any:
    import torch

    member = torch.zeros(len(expert_domain), n_domains, dtype=torch.float64)
    member[torch.arange(len(expert_domain)), torch.tensor(expert_domain)] = 1.0
    return member  # [n_experts, n_domains]


def evaluate(router, volumes: list[dict[str, Any]], layer: str, expert_domain: list[int],
             n_domains: int) -> dict[str, Any]:
    """Accuracy (domain and expert rules), per domain, and mean margin of ``router`` on labelled ``volumes``."""
    import torch

    member = _membership(expert_domain, n_domains)
    ok_dom, ok_exp, margins, per_domain = [], [], [], {}
    for v in volumes:
        s = router.scores(v["feats"][layer]).mean(dim=0)  # [n_experts], as predict_volume
        d = s @ member  # [n_domains]: summed over each domain's experts
        own = v["domain"]
        others = torch.cat([d[:own], d[own + 1:]])
        margins.append(float(d[own] - others.max()))
        ok_dom.append(int(d.argmax()) == own)
        ok_exp.append(expert_domain[int(s.argmax())] == own)
        per_domain.setdefault(own, []).append(ok_dom[-1])
    n = len(volumes)
    return {"n": n, "acc": sum(ok_dom) / n, "correct": sum(ok_dom), "acc_expert_rule": sum(ok_exp) / n,
            "mean_margin": sum(margins) / n,
            "acc_per_domain": {int(k): sum(v) / len(v) for k, v in sorted(per_domain.items())}}


def fit_accuracy(router, train: list[Any], expert_domain: list[int], n_domains: int) -> float:
    """Fraction of the fitted rows (patches or windows) whose domain the router predicts."""
    member = _membership(expert_domain, n_domains)
    ok = n = 0
    for e, x in enumerate(train):
        pred = (router.scores(x) @ member).argmax(dim=1)
        ok += int((pred == expert_domain[e]).sum())
        n += x.shape[0]
    return ok / n


def grid(train: list[Any], volumes: dict[str, list[dict[str, Any]]], layer: str, expert_domain: list[int],
         n_domains: int, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """Every (random_features, gamma) setting fitted on ``train`` (one tensor per expert) and scored; the
    selected (validation) and the protocol-default rows."""
    rows = []
    for rf in args.expansions:
        for pseed in (args.projection_seeds if rf else [0]):
            for g in args.gammas:
                tr = time.time()
                router = fit_router(train, train[0].shape[1], g, rf, pseed)
                row = {"random_features": rf, "gamma": g, "projection_seed": pseed if rf else None,
                       "fit_acc": fit_accuracy(router, train, expert_domain, n_domains),
                       "val": evaluate(router, volumes["val"], layer, expert_domain, n_domains),
                       "test": evaluate(router, volumes["test"], layer, expert_domain, n_domains)}
                row["fit_eval_s"] = round(time.time() - tr, 2)
                rows.append(row)
                _log(f"{tag}: rf={rf} seed={pseed} gamma={g}: fit {row['fit_acc']:.3f} "
                     f"val {row['val']['acc']:.3f} test {row['test']['acc']:.3f} ({row['fit_eval_s']} s)")
    best = max(range(len(rows)), key=lambda i: (rows[i]["val"]["acc"], rows[i]["val"]["mean_margin"], -i))
    default = next((i for i, r in enumerate(rows) if (r["random_features"], r["gamma"]) == DEFAULT_SETTING), None)
    return {"rows": rows, "selected": best, "protocol_default": default}


def run_scenario(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from cfseg.module import load_checkpoint

    sc = SCENARIOS[name]
    ckpt = args.checkpoint.get(name, sc["checkpoint"])
    t0 = time.time()
    module = load_checkpoint(ckpt).eval()
    default_layer = module.statistics.router_layer
    layers = [default_layer] + [x for x in args.layers if x != default_layer]
    layer_names = {}
    for layer in layers:
        module.statistics.router_layer = layer
        layer_names[layer] = module.router_layer_name()
    module.statistics.router_layer = default_layer
    data, stages = stage_plan(sc["protocol"])
    domains: list[str] = []
    expert_domain: list[int] = []
    for st in stages:
        dom = _domain_of(module, st["datasets"], data)
        if dom not in domains:
            domains.append(dom)
        expert_domain.append(domains.index(dom))
    n_domains = len(domains)
    _log(f"{name}: stages {[s['name'] for s in stages]} -> domains {[domains[d] for d in expert_domain]}; "
         f"layers {layer_names}")

    timing: dict[str, float] = {}
    t = time.time()
    patches, n_batches = [], []
    for st in stages:
        x, nb = patch_features(module, st["datasets"], data, max(args.batches), args.seed, layers)
        patches.append(x)
        n_batches.append(nb)
        _log(f"{name}: stage {st['name']}: {x[default_layer].shape[0]} patches from {nb} batches")

    def first_batches(x: dict[str, Any], layer: str, n: int) -> Any:
        return x[layer][: sum(x["rows_per_batch"][:n])]

    timing["patch_features_s"] = round(time.time() - t, 1)

    volumes: dict[str, list[dict[str, Any]]] = {}
    for split in ("val", "test") + (("train",) if args.window_statistics else ()):
        t = time.time()
        cap = {"val": args.max_val, "test": args.max_test, "train": args.max_train}[split]
        volumes[split] = []
        taken: dict[Any, int] = {}  # val/test: capped per domain; train (every expert needs rows): per stage
        for i, (st, d) in enumerate(zip(stages, expert_domain, strict=True)):
            key = ("stage", i) if split == "train" else d
            left = None if cap is None else max(0, cap - taken.get(key, 0))
            vols = volume_features(module, st["datasets"], data, split, left, layers) if left != 0 else []
            for v in vols:
                v["domain"], v["stage"] = d, st["name"]
            taken[key] = taken.get(key, 0) + len(vols)
            volumes[split] += vols
        timing[f"{split}_volume_features_s"] = round(time.time() - t, 1)
        _log(f"{name}: {split}: {len(volumes[split])} volumes, "
             f"{sum(v['feats'][default_layer].shape[0] for v in volumes[split])} windows")

    checks: dict[str, Any] = {}
    train0 = [first_batches(p, default_layer, args.batches[0]) for p in patches]
    in_features = train0[0].shape[1]
    # the domain rule equals a router fitted on one-hot domain targets (linearity of W in Q)
    ref = fit_router([], in_features, 1.0, 0, 0)
    for e, x in enumerate(train0):  # domains are numbered in order of first appearance: a new one is n_experts
        ref.update(x, expert_domain[e])
    per_expert = fit_router(train0, in_features, 1.0, 0, 0)
    probe = torch.cat([v["feats"][default_layer] for v in volumes["val"]])
    diff = float((ref.scores(probe) - per_expert.scores(probe) @ _membership(expert_domain, n_domains)).abs().max())
    assert diff < 1e-6, f"domain-target router differs from summed expert scores by {diff}"
    checks["domain_router_equals_summed_experts_max_abs_diff"] = diff
    # the windows are route's: route() on the first validation volume picks the same expert
    first = next(v for v in volumes["val"] if v.get("image") is not None)
    saved = (module.router, module.expert_records)
    try:
        module.router = per_expert
        module.expert_records = [{"expert": e, "classes": [], "domains": [domains[d]]}
                                 for e, d in enumerate(expert_domain)]
        routed = module.route(first["image"])["expert"]
    finally:
        module.router, module.expert_records = saved
    mine = per_expert.predict_volume(first["feats"][default_layer])
    assert routed == mine, f"route() picked expert {routed}, the cached windows {mine}"
    checks["route_agrees_on"] = f"{first['dataset']}/{first['case_id']} (expert {routed})"

    t = time.time()
    variants = []
    for layer in layers:
        kinds = [(f"patches ({n} batches)" if i else "patches", n, [first_batches(p, layer, n) for p in patches])
                 for i, n in enumerate(args.batches) if i == 0 or layer == default_layer]
        if args.window_statistics:
            by_stage = [[v["feats"][layer] for v in volumes["train"] if v["stage"] == st["name"]] for st in stages]
            kinds.append(("windows", None, [torch.cat(w) for w in by_stage]))
        for kind, n_batches_used, train in kinds:
            res = grid(train, volumes, layer, expert_domain, n_domains, args, f"{name} {layer_names[layer]} {kind}")
            variants.append({"layer": layer, "layer_name": layer_names[layer], "statistics": kind,
                             "in_features": int(train[0].shape[1]), "n_fit": [int(x.shape[0]) for x in train],
                             "batches": n_batches_used,
                             "main": layer == default_layer and kind == "patches", **res})
    timing["fit_eval_s"] = round(time.time() - t, 1)
    timing["total_s"] = round(time.time() - t0, 1)

    def counts(split: str) -> dict[str, int]:
        return {domains[d]: sum(v["domain"] == d for v in volumes[split]) for d in range(n_domains)}

    splits = list(volumes)
    return {
        "protocol": sc["protocol"], "checkpoint": ckpt, "domains": domains,
        "stages": [{"name": st["name"], "domain": domains[d], "datasets": [e["path"] for e in st["datasets"]],
                    "patches": int(first_batches(x, default_layer, args.batches[0]).shape[0]),
                    "batches": min(nb, args.batches[0]),
                    "patches_per_batch_count": {n: int(first_batches(x, default_layer, n).shape[0])
                                                for n in args.batches}}
                   for st, d, x, nb in zip(stages, expert_domain, patches, n_batches, strict=True)],
        "data": {k: data[k] for k in ("patch_size", "batch_size", "samples_per_volume", "crop", "class_ratios",
                                      "augment", "split_seed") if k in data},
        "roi_size": [int(r) for r in module.hparams.roi_size],
        "volumes": {s: counts(s) for s in splits},
        "windows": {s: sum(int(v["feats"][default_layer].shape[0]) for v in volumes[s]) for s in splits},
        "volume_shapes": {s: sorted({tuple(v["shape"]) for v in volumes[s]}) for s in splits},
        "caps": {"max_val": args.max_val, "max_test": args.max_test, "max_train": args.max_train},
        "checks": checks, "variants": variants, "timing": timing,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _table(r: dict[str, Any], var: dict[str, Any]) -> list[str]:
    multi = len(r["stages"]) > len(r["domains"])
    unit = var["statistics"].split()[0]
    head = f"| random features | gamma | fit ({unit}) | val | test | test per domain |"
    sep = "|---|---|---|---|---|---|"
    if multi:
        head += " test, expert rule |"
        sep += "---|"
    out = [head + " val margin |", sep + "---|"]
    for i, row in enumerate(var["rows"]):
        tag = (" **(selected)**" if i == var["selected"] else "") + \
              (" (default)" if i == var["protocol_default"] else "")
        rf = str(row["random_features"]) + (f" (seed {row['projection_seed']})"
                                           if row["projection_seed"] not in (None, 0) else "")
        dom = ", ".join(f"{r['domains'][int(k)]} {_pct(a)}" for k, a in row["test"]["acc_per_domain"].items())
        line = (f"| {rf}{tag} | {row['gamma']:g} | {_pct(row['fit_acc'])} | "
                f"{_pct(row['val']['acc'])} ({row['val']['correct']}/{row['val']['n']}) | "
                f"{_pct(row['test']['acc'])} ({row['test']['correct']}/{row['test']['n']}) | {dom} |")
        if multi:
            line += f" {_pct(row['test']['acc_expert_rule'])} |"
        out.append(line + f" {row['val']['mean_margin']:.3f} |")
    s = var["rows"][var["selected"]]
    out += ["", f"Validation picks random_features {s['random_features']}, gamma {s['gamma']:g}: test accuracy "
            f"{_pct(s['test']['acc'])} % ({s['test']['correct']}/{s['test']['n']})."]
    return out


def render(results: dict[str, Any], command: str) -> str:
    meta = results["meta"]
    out = ["# Router ablation: feature expansion and ridge strength of the analytic router", "",
           "```", command, "```", "",
           f"{meta['date']}, torch {meta['torch']}, {meta['threads']} torch thread(s), {meta['machine']}; "
           f"total wall time {meta['wall_s']:.0f} s (other jobs shared the 2 cores). "
           "Accuracy (%): fraction of volumes routed to their own domain; `fit`: the same on the rows the router "
           "was fitted on. Generated by `benchmarks/router_ablation.py` (its docstring has the protocol).", ""]
    for name, r in results["scenarios"].items():
        out += [f"## {name}", "", f"Checkpoint `{r['checkpoint']}`, protocol `{r['protocol']}`, roi {r['roi_size']}.",
                ""]
        for st in r["stages"]:
            out.append(f"- expert {st['name']} (domain `{st['domain']}`): {st['patches']} training patches "
                       f"({st['batches']} batches) from {', '.join(st['datasets'])}")
        v, w = r["volumes"], r["windows"]
        out += ["- volumes (windows): " + "; ".join(f"{s} {v[s]} ({w[s]})" for s in v) + f"; caps {r['caps']}",
                f"- checks: {r['checks']}", f"- wall time: {r['timing']}", ""]
        for var in sorted(r["variants"], key=lambda x: not x["main"]):
            title = "main grid" if var["main"] else "diagnostic"
            out += [f"### {name}: {title}: layer `{var['layer_name']}` ({var['in_features']} features), fitted on "
                    f"training {var['statistics']} ({' + '.join(map(str, var['n_fit']))} rows per expert)", ""]
            out += _table(r, var) + [""]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--checkpoint", nargs="*", default=[], metavar="SCENARIO=PATH",
                   help="override a scenario's checkpoint")
    p.add_argument("--batches", type=int, nargs="+", default=[16],
                   help="training batches per stage (model.router_batches); more values: diagnostic rows with the "
                        "first N batches of the same loader sequence (the checkpoint's layer only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training loader's crops and shuffling")
    p.add_argument("--expansions", type=int, nargs="+", default=list(EXPANSIONS))
    p.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS))
    p.add_argument("--projection-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--max-val", type=int, default=None, help="at most this many validation volumes per domain")
    p.add_argument("--max-test", type=int, default=None, help="at most this many test volumes per domain")
    p.add_argument("--layers", nargs="*", default=[],
                   help="also these router_layer patterns (diagnostic; the checkpoint's layer always runs)")
    p.add_argument("--window-statistics", action="store_true",
                   help="diagnostic: also fit on the dense windows of training volumes (route's distribution)")
    p.add_argument("--max-train", type=int, default=None,
                   help="--window-statistics: at most this many training volumes per stage")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    args.checkpoint = dict(c.split("=", 1) for c in args.checkpoint)

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    results: dict[str, Any] = {"scenarios": {}}
    for name in args.scenarios:
        results["scenarios"][name] = run_scenario(name, args)
    results["meta"] = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": args.threads,
                       "machine": f"{platform.machine()}, {os.cpu_count()} cores", "wall_s": round(time.time() - t0, 1),
                       "args": vars(args)}
    command = "OMP_NUM_THREADS=1 python benchmarks/router_ablation.py " + shlex.join(sys.argv[1:] if argv is None
                                                                                     else argv)
    results["meta"]["command"] = command
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        Path(f"{args.out}.md").write_text(render(results, command))
        _log(f"wrote {args.out}.json and {args.out}.md")
    for name, r in results["scenarios"].items():
        for var in r["variants"]:
            s = var["rows"][var["selected"]]
            _log(f"{name} {var['layer_name']} {var['statistics']}: selected rf={s['random_features']} "
                 f"gamma={s['gamma']}: val {s['val']['acc']:.3f} test {s['test']['acc']:.3f}")

if __name__ == "__main__":
    main()
