"""LoRA experts at inference and the statistics that route between them (a mixin of :class:`cfseg.module.CFSegModule`).

A model trained with :class:`cfseg.continual.Experts` stages has one expert per stage (expert 0: the shared
network) with a record of what it serves (classes, domains, modalities). At inference each class comes from the
expert of the stage that trained it, in the domain the ridge router (:class:`cfseg.continual.router.RidgeRouter`)
picks for the volume; a modality router answers which modality an image is. The router statistics are collected
at the end of stage 0 and of every experts stage (:meth:`RoutedExperts.collect_router_statistics`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from monai import transforms as mt
from monai.data.utils import dense_patch_slices
from torch import nn

from cfseg.continual import experts
from cfseg.continual.router import ModalityRouter, RidgeRouter, pooled_features
from cfseg.continual.stages import training_batches
from cfseg.data.transforms import Preprocessing, deterministic_transforms, neutral_view
from cfseg.distributed import gather_rows, per_rank, shared_map
from cfseg.heads import deepest_layer


class RoutedExperts:
    """Experts, records and routers of a :class:`cfseg.module.CFSegModule` (which provides ``net``, ``bank``,
    ``statistics``, ``hparams.roi_size``, ``trainer`` and :meth:`forward_active`)."""

    def init_experts(self) -> None:
        """No experts yet: one record per expert (0: the shared network), the LoRA layout, the routers."""
        self.expert_records: list[dict[str, Any]] = []
        self.expert_layout: dict[str, Any] | None = None
        self.router: RidgeRouter | None = None
        self.modality_router: ModalityRouter | None = None  # which modality an image is (neutral view)
        self.route_override: int | None = None  # force one expert for every class (cfseg-segment --expert)
        self.last_route: dict[str, Any] | None = None

    def start_experts_from(self, teacher: Any) -> None:
        """Copy the previous stage's records and routers, and attach its LoRA layout (before its weights load)."""
        self.expert_records = [dict(r) for r in teacher.expert_records]
        if not self.expert_records:  # a checkpoint trained before experts existed: expert 0 serves all it knows
            self.expert_records = [expert_record(0, teacher.bank.classes, sorted({
                d.get("domain") or "" for st in teacher.stage_history for d in st.get("datasets", [])} - {""}))]
        self.router = RidgeRouter.from_state(teacher.router.state()) if teacher.router is not None else None
        self.modality_router = (ModalityRouter.from_state(teacher.modality_router.state())
                                if teacher.modality_router is not None else None)
        if teacher.expert_layout is not None:
            self.attach_experts(teacher.expert_layout, experts.n_experts(teacher.net))

    def record_stage_experts(self, trained_expert: int | None, classes: list[str], domains: list[str],
                             modalities: list[str]) -> None:
        """The records after this stage: ``trained_expert`` serves what the stage trained; None: the whole network
        changed, so expert 0 serves everything it learnt."""
        if trained_expert is not None:
            self.expert_records = [*self.expert_records[:trained_expert],
                                   expert_record(trained_expert, classes, domains, modalities)]
            return
        old = self.expert_records[0] if self.expert_records else {"classes": [], "domains": []}
        self.expert_records = [expert_record(0, [c for c in self.bank.classes if c in classes or c in old["classes"]],
                                             sorted(set(domains) | set(old["domains"])),
                                             sorted(set(modalities) | set(old.get("modalities", []))))]

    def attach_experts(self, layout: dict[str, Any], n_total: int) -> None:
        """LoRA layers of ``layout`` on ``self.net`` with experts 1..n_total-1 (zero-initialised)."""
        experts.attach_lora(self.net, layout["layers"], int(layout["rank"]), float(layout["alpha"]),
                            bool(layout.get("projection", False)))
        while experts.n_experts(self.net) < n_total:
            experts.add_expert(self.net)
        self.expert_layout = dict(layout)

    def restore_experts(self, state: dict[str, Any]) -> None:
        """Rebuild the experts of a saved checkpoint (:meth:`experts_state`) before its weights are loaded."""
        self.expert_records = [dict(r) for r in state.get("records", [])]
        if state.get("layout") and len(self.expert_records) > 1:
            self.attach_experts(state["layout"], len(self.expert_records))
        if state.get("router"):
            self.router = RidgeRouter.from_state(state["router"])
        if state.get("modality_router"):
            self.modality_router = ModalityRouter.from_state(state["modality_router"])

    def experts_state(self) -> dict[str, Any]:
        """Experts metadata saved in the checkpoint: records, LoRA layout and router statistics (data only)."""
        return {"records": [dict(r) for r in self.expert_records], "layout": self.expert_layout,
                "router": self.router.state() if self.router is not None else None,
                "router_layer": self.statistics.router_layer,
                "modality_router": self.modality_router.state() if self.modality_router is not None else None}

    @property
    def n_experts(self) -> int:
        """Experts of the network including expert 0 (the shared weights); 1 without LoRA experts."""
        if self.expert_layout is None:  # no LoRA attached (the forward path asks this per window batch)
            return 1
        return experts.n_experts(self.net)

    def routing_domains(self) -> list[str]:
        return sorted({d for r in self.expert_records for d in r.get("domains", [])})

    @property
    def can_route(self) -> bool:
        """Whether the router can pick a domain: experts of two or more domains and statistics for every expert."""
        return (self.router is not None and self.n_experts > 1 and len(self.routing_domains()) > 1
                and self.router.n_experts == len(self.expert_records))

    def expert_plan(self, class_indices: Sequence[int], domain: str | None = None) -> dict[int, list[int]]:
        """Which expert segments which class: ``{expert: [global class indices]}``.

        A class is served by the experts of the stages that trained it (annotated it); among those, the latest of
        the routed ``domain`` if there is one, else the latest. ``route_override`` sends every class to one expert.
        """
        if self.route_override is not None:
            return {int(self.route_override): [int(k) for k in class_indices]}
        plan: dict[int, list[int]] = {}
        names = self.bank.names
        for k in class_indices:
            serving = [e for e, r in enumerate(self.expert_records) if names[int(k)] in r["classes"]] or [0]
            in_domain = [e for e in serving if domain is not None and domain in self.expert_records[e]["domains"]]
            plan.setdefault((in_domain or serving)[-1], []).append(int(k))
        return plan

    def router_features(self, x: torch.Tensor) -> torch.Tensor:
        """Router features [B, 2C] of images ``x`` [B, C, *S]: the pooled ``router_layer`` output of the shared
        network (expert 0); the rest of the network is not run."""
        name = self.router_layer_name()
        layer = self.net.backbone.get_submodule(name)
        store: list[torch.Tensor] = []

        class _Stop(Exception):
            pass

        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            store.append(out[0] if isinstance(out, (tuple, list)) else out)
            raise _Stop

        handle = layer.register_forward_hook(hook)
        try:
            with torch.no_grad(), experts.active_expert(self.net, 0):
                self.net.backbone(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not store:
            raise ValueError(f"router layer {name!r} did not run in the backbone's forward pass")
        return pooled_features(store[0].float()).as_subclass(torch.Tensor)  # plain data, never a MetaTensor

    def router_layer_name(self) -> str:
        return deepest_layer(self.net.backbone, self.statistics.router_layer, "model.statistics.router_layer")

    def route(self, image: torch.Tensor) -> dict[str, Any]:
        """Top-1 expert and its domain for one preprocessed volume ``image`` [1, C, *S] (see :meth:`route_scores`)."""
        e = int(self.route_scores(image).argmax())
        return {"expert": e, "domains": list(self.expert_records[e]["domains"]), "stage": e}

    def route_scores(self, image: torch.Tensor) -> torch.Tensor:
        """Mean router score per expert [n_experts] for one preprocessed volume ``image`` [1, C, *S].

        The volume is covered by ``roi_size`` windows without overlap except at the far borders (the last window
        ends at the border; zero padding only where the volume is smaller than a window), the router scores each
        window's features and the mean score picks the expert (as :meth:`RidgeRouter.predict_volume`).
        """
        if self.router is None:
            raise ValueError("this checkpoint has no router statistics")
        return self.router.scores(self.window_features(image)).mean(0)

    def window_features(self, image: torch.Tensor) -> torch.Tensor:
        """Router features [N_windows, 2C] of one volume [1, C, *S] covered by ``roi_size`` windows (see
        :meth:`route_scores`)."""
        roi = [int(r) for r in self.hparams.roi_size]
        x = image[:1].as_subclass(torch.Tensor) if isinstance(image, torch.Tensor) else image
        pad = [max(0, r - n) for n, r in zip(x.shape[2:], roi, strict=True)]
        x = torch.nn.functional.pad(x, [p for q in reversed(pad) for p in (0, q)])
        p0 = next(self.parameters())
        feats = [self.router_features(x[(slice(None), slice(None), *sl)].to(p0.device, p0.dtype)).cpu()
                 for sl in dense_patch_slices(tuple(x.shape[2:]), roi, roi)]
        return torch.cat(feats)

    def modality_scores(self, view: torch.Tensor) -> dict[str, float]:
        """Mean modality-router score per modality for one volume in the modality-neutral view [1, C, *S]
        (:func:`cfseg.segmentation.modality_view`); the highest names the modality."""
        if self.modality_router is None:
            raise ValueError("this checkpoint has no modality router statistics")
        return self.modality_router.scores(self.window_features(view))

    def collect_modality_statistics(self) -> None:
        """Modality-router statistics from up to ``router_batches`` training cases of each dataset of this stage,
        each loaded in the modality-neutral view and covered by windows (as at inference)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        datasets = [(d, items) for d in getattr(dm, "datasets", []) if (items := dm.items(d, "train"))]
        if not datasets:
            return
        if self.modality_router is not None:
            view = Preprocessing.from_dict(self.modality_router.view)
        else:
            first = dm.preprocessing(datasets[0][0].info.modality)
            view = neutral_view(first.spacing, first.orientation)
        load = mt.Compose(deterministic_transforms(view, labeled=False))
        cases = []
        for d, items in datasets:
            k = min(self.statistics.router_batches, len(items))  # k cases spread evenly over the training cases
            cases += [(d.info.modality, items[i]["image"])
                      for i in sorted({round(j * (len(items) - 1) / max(1, k - 1)) for j in range(k)})]
        # under DDP each process computes its share of the cases and every process updates with all of them
        features = shared_map(lambda case: self.window_features(load({"image": case[1]})["image"][None]), cases)
        for (modality, _), feats in zip(cases, features, strict=True):
            if self.modality_router is None:  # the feature width comes from the first case
                self.modality_router = ModalityRouter(feats.shape[1], view.to_dict(),
                                                      gamma=self.statistics.router_modality_gamma)
            self.modality_router.update(feats, modality)

    def collect_router_statistics(self, expert: int) -> None:
        """Router statistics of this stage's training images for ``expert`` (``router_batches`` batches, from the
        shared network as it will stay frozen) and the modality router's; once per fit, in eval mode."""
        if self.statistics.router_batches <= 0:
            return
        was_training = self.training
        self.eval()
        try:
            self.collect_expert_router_statistics(expert)
            self.collect_modality_statistics()
        finally:
            self.train(was_training)

    def collect_expert_router_statistics(self, expert: int) -> None:
        """Router statistics of this stage's training images for ``expert`` (``router_batches`` batches).

        Under DDP each process reads its share of the batches (:func:`cfseg.distributed.per_rank`) and every
        process updates the router with the features of all of them (:func:`cfseg.distributed.gather_rows`), so
        ``G``, ``Q`` and the sample counts are those of one process over the same cases, on every rank.
        """
        h = self.statistics
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        if loader is None or h.router_batches <= 0:
            return
        if self.router is None and expert != 0:
            return  # no statistics for the earlier experts: routing would be wrong, so none is kept
        dtype = next(self.parameters()).dtype
        for batch in itertools.islice(training_batches(loader), per_rank(h.router_batches)):
            feats = gather_rows(self.router_features(batch["image"].to(self.device, dtype)).cpu())
            if self.router is None:  # the feature width comes from the first batch
                self.router = RidgeRouter(feats.shape[1], gamma=h.router_gamma,
                                          random_features=h.router_random_features,
                                          seed=int(torch.initial_seed()) % 2**31)
            self.router.update(feats, expert)

    def experts_forward(self, x: torch.Tensor, class_indices: Sequence[int] | None) -> torch.Tensor:
        ks = list(range(1, len(self.bank.names))) if class_indices is None else \
            [int(i) for i in class_indices if int(i) != 0]
        domains = (self.last_route or {}).get("domains") or [None]
        plan = self.expert_plan(ks, domains[0])
        if len(plan) == 1:
            (e, _), = plan.items()
            with experts.active_expert(self.net, e):
                return self.forward_active(x, ks)
        position = {k: i + 1 for i, k in enumerate(ks)}
        out = None
        with experts.shared_prefix_cache(self.net.backbone):
            for e, mine in plan.items():
                others = [k for k in self.known_classes(e) if k not in mine]
                with experts.active_expert(self.net, e):
                    lp = self.forward_active(x, mine + others).float().log_softmax(1)
                rest = torch.logsumexp(lp[:, [0, *range(len(mine) + 1, lp.shape[1])]], dim=1)
                if out is None:
                    out = lp.new_zeros((lp.shape[0], len(ks) + 1, *lp.shape[2:]))
                for j, k in enumerate(mine):
                    torch.sub(lp[:, j + 1], rest, out=out[:, position[k]])
        return out

    def known_classes(self, expert: int) -> list[int]:
        """Bank indices of the classes known when ``expert`` was trained (its and the earlier experts' stages)."""
        known = {c for r in self.expert_records[: expert + 1] for c in r["classes"]}
        return [k for k, name in enumerate(self.bank.names) if k > 0 and name in known]



def expert_record(expert: int, classes: list[str], domains: list[str],
                  modalities: list[str] | None = None) -> dict[str, Any]:
    """What one expert serves: the classes its stage trained, the domains and modalities of its training images."""
    return {"expert": int(expert), "classes": list(classes), "domains": list(domains),
            "modalities": list(modalities if modalities is not None else domains)}

