"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017) with a diagonal Fisher: the regularisation baseline.

After a stage, the parameters ``theta*`` and their importance ``F`` (the diagonal of the empirical Fisher
information, :func:`diagonal_fisher`) are stored; the next stage minimises

    loss_new(theta) + lambda / 2 * ewc_penalty(theta),    ewc_penalty = sum_i F_i (theta_i - theta*_i)^2

**Units of lambda.** :func:`ewc_penalty` returns the sum *without* the factor 1/2: the caller multiplies it by
``lambda / 2``, as in the paper's Eq. 3. ``F`` is a mean of squared loss gradients, so it scales with the square
of the loss's normalisation (a loss averaged over voxels gives a small ``F``): ``lambda`` is a dimensionless
weight relative to that scale, and a value (e.g. 100, the EvoSAM baseline's) carries over between papers only
with the same loss and reduction.

Over several stages, :func:`merge_fisher` accumulates the importances (online EWC with ``old_weight`` < 1), and
the anchors are the latest stage's parameters; :class:`EWCState` holds both.

Functional core: pure functions of parameters and dicts ``name -> tensor`` (plain tensors: a checkpoint stores
them as data).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from cfseg.continual.strategy import StepContext, Strategy
from cfseg.distributed import global_sum, global_sums, per_rank

if TYPE_CHECKING:  # the module holds the strategy; annotations only
    from cfseg.module import CFSegModule

__all__ = ["EWC", "EWCState", "diagonal_fisher", "ewc_penalty", "merge_fisher", "squared_gradient_sums",
           "stage_fisher"]


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    max_batches: int,
) -> dict[str, Tensor]:
    """Empirical diagonal Fisher: the mean over batches of the squared gradient of the batch loss.

    ``F_i = 1/N sum_b (d loss_fn(model, batch_b) / d theta_i)^2`` over the first ``N <= max_batches`` batches
    (with batches of one sample this is the per-sample empirical Fisher of the paper; larger batches square
    the batch-mean gradient, the usual cheaper estimate). The model runs in eval mode (no dropout, batch-norm
    statistics untouched) and its train/eval mode is restored afterwards. Gradients are taken with
    :func:`torch.autograd.grad`, so the parameters' ``.grad`` are left as they were (no gradient is created or
    accumulated). A parameter the loss does not reach gets a zero Fisher.

    Args:
        model: the network at the end of a stage (``theta*``).
        batches: an iterable of batches (e.g. a training DataLoader); only the first ``max_batches`` are read.
        loss_fn: ``loss_fn(model, batch)`` -> 0-dim loss tensor (moving the batch to the model's device is its
            job).
        max_batches: at most this many batches (>= 1).

    Returns:
        ``{name: F}`` for every parameter with ``requires_grad``: float32 tensors shaped like the parameter,
        detached, on the CPU.

    Raises:
        ValueError: ``max_batches < 1``, no batch in ``batches``, a loss that is not a scalar, or no trainable
            parameter.
    """
    sums, seen = squared_gradient_sums(model, batches, loss_fn, max_batches)
    return {n: (s / seen).cpu() for n, s in sums.items()}


def squared_gradient_sums(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    max_batches: int,
) -> tuple[dict[str, Tensor], int]:
    """``({name: sum_b g_b^2}, N)``: the sums :func:`diagonal_fisher` divides by the ``N`` batches it read (float32,
    on the parameters' device), so that sums over several processes can be added before the division."""
    if max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameter with requires_grad: nothing to consolidate")
    params = [p for _, p in named]
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    was_training = model.training
    seen = 0
    try:
        model.eval()
        with torch.enable_grad():
            for batch in batches:
                if seen >= max_batches:
                    break
                loss = loss_fn(model, batch)
                if loss.dim() != 0:
                    raise ValueError(f"loss_fn must return a 0-dim loss, got shape {tuple(loss.shape)}")
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for s, g in zip(sums, grads, strict=True):
                    if g is not None:
                        s += g.detach().float() ** 2
                seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("diagonal_fisher saw no batch: the batch iterable is empty")
    return {n: s for (n, _), s in zip(named, sums, strict=True)}, seen


def _check_shape(name: str, what: str, t: Tensor, p: Tensor) -> None:
    if t.shape != p.shape:
        raise ValueError(f"EWC {what} of parameter {name!r} has shape {tuple(t.shape)}, the parameter "
                         f"{tuple(p.shape)}: the stored EWC state belongs to another network")


def ewc_penalty(
    named_params: Iterable[tuple[str, Tensor]],
    anchors: dict[str, Tensor],
    fisher: dict[str, Tensor],
) -> Tensor:
    """``sum_i F_i (theta_i - theta*_i)^2`` over the parameters named in both ``anchors`` and ``fisher``.

    No factor 1/2 here: the caller adds ``lambda / 2 * ewc_penalty(...)`` to the loss (see the module docstring),
    so the penalty's gradient is ``2 F (theta - theta*)``.

    Args:
        named_params: ``(name, theta)`` pairs, e.g. ``model.named_parameters()``; parameters missing from
            either dict (e.g. a head added in this stage) contribute nothing.
        anchors: ``{name: theta*}``, the previous stage's parameters (any device; treated as constants).
        fisher: ``{name: F}``, shaped like the parameters.

    Returns:
        A 0-dim tensor on the parameters' device, differentiable w.r.t. ``theta`` (0 when no name matches).

    Raises:
        ValueError: an anchor or Fisher tensor whose shape differs from its parameter's (named).
    """
    total: Tensor | None = None
    device = None
    for name, p in named_params:
        device = p.device
        if name not in anchors or name not in fisher:
            continue
        a, f = anchors[name], fisher[name]
        _check_shape(name, "anchor", a, p)
        _check_shape(name, "Fisher", f, p)
        a = a.detach().to(device=p.device, dtype=p.dtype)
        f = f.detach().to(device=p.device, dtype=p.dtype)
        term = (f * (p - a) ** 2).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros((), device=device)


def merge_fisher(
    old: dict[str, Tensor] | None, new: dict[str, Tensor], old_weight: float = 1.0
) -> dict[str, Tensor]:
    """Importance accumulated over stages: ``old_weight * old + new`` per name.

    ``old_weight = 1`` sums the stages' Fishers (one penalty with the summed importance, the usual multi-task
    EWC with the latest anchors); ``old_weight < 1`` decays older stages (online EWC, Schwarz et al. 2018).
    Names present in only one dict are kept (the old ones scaled by ``old_weight``). Inputs are not modified.

    Raises:
        ValueError: negative ``old_weight``, or a name whose old and new tensors differ in shape.
    """
    if old_weight < 0:
        raise ValueError(f"old_weight must be >= 0, got {old_weight}")
    out = {n: f.detach().clone() for n, f in new.items()}
    for n, f in (old or {}).items():
        if n not in out:
            out[n] = old_weight * f.detach()
            continue
        if f.shape != out[n].shape:
            raise ValueError(f"Fisher of parameter {n!r}: old shape {tuple(f.shape)}, new {tuple(out[n].shape)}")
        out[n] = old_weight * f.detach().to(out[n]) + out[n]
    return out


@dataclass
class EWCState:
    """What EWC carries from one stage to the next: anchors ``theta*`` and accumulated Fisher (CPU tensors)."""

    anchors: dict[str, Tensor]
    fisher: dict[str, Tensor]

    @classmethod
    def consolidate(
        cls, model: nn.Module, fisher: dict[str, Tensor], previous: EWCState | None = None, old_weight: float = 1.0
    ) -> EWCState:
        """The state after a stage: the model's current parameters as anchors, ``fisher`` merged into the
        previous state's (:func:`merge_fisher`)."""
        merged = merge_fisher(previous.fisher if previous is not None else None, fisher, old_weight)
        anchors = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n in merged}
        return cls(anchors=anchors, fisher=merged)

    def penalty(self, model: nn.Module) -> Tensor:
        """:func:`ewc_penalty` of ``model``'s parameters (multiply by ``lambda / 2``)."""
        return ewc_penalty(model.named_parameters(), self.anchors, self.fisher)


def stage_fisher(module: CFSegModule, batches: Iterable[dict[str, Any]], n_batches: int,
                 previous: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The diagonal Fisher of ``module``'s supervised loss over ``n_batches`` of ``batches`` at its current
    weights, added to ``previous`` (the accumulated importance of earlier stages; :func:`merge_fisher`).

    Under DDP ``batches`` are this process's share: each process reads :func:`cfseg.distributed.per_rank` of the
    ``n_batches`` and the squared-gradient sums and batch counts are summed over processes before the division, so
    every process holds the Fisher of all the batches read.
    """

    def loss_fn(net: nn.Module, batch: dict[str, Any]) -> Tensor:
        x = batch["image"].to(module.device).as_subclass(Tensor)
        batch = {k: (v.to(module.device).as_subclass(Tensor) if isinstance(v, Tensor) else v)
                 for k, v in batch.items()}
        return module.loss(module.logits_from_features(*net.encode(x)), batch).float()

    with torch.enable_grad():
        sums, seen = squared_gradient_sums(module.net, batches, loss_fn, per_rank(n_batches))
    total = global_sum(torch.tensor(float(seen), dtype=torch.float64))
    new = {n: (s / total.to(s)).cpu() for n, s in global_sums(sums).items()}
    return merge_fisher({n: f.cpu() for n, f in previous.items()} if previous else None, new)


class EWC(Strategy):
    """Fine-tuning with the EWC penalty ``penalty_weight / 2 * sum_i F_i (theta_i - theta*_i)^2`` towards the
    previous stage's weights ``theta*``, weighted by the Fisher it stored (a reference baseline; units: this
    module's docstring). Its own stage adds its Fisher to the accumulated one.

    Args:
        penalty_weight: EWC's ``lambda``.
    """

    short_name = "ewc"
    requires_previous = True

    def __init__(self, penalty_weight: float = 100.0):
        self.penalty_weight = penalty_weight
        self.anchors: dict[str, Tensor] = {}
        self.fisher: dict[str, Tensor] = {}

    def setup(self, module: CFSegModule, teacher: CFSegModule) -> None:
        super().setup(module, teacher)
        if not teacher.ewc_fisher:
            raise ValueError(f"{module.hparams.previous_checkpoint} carries no Fisher information: train the previous "
                             "stage with model.statistics.fisher_batches > 0 (stage 0 and ewc stages store it)")
        self.anchors = {n: p.detach().clone() for n, p in teacher.net.named_parameters()}
        self.fisher = dict(teacher.ewc_fisher)

    def penalty(self, module: CFSegModule, step: StepContext) -> dict[str, Tensor]:
        device = step.batch["image"].device
        if next(iter(self.anchors.values())).device != device:
            self.anchors = {n: t.to(device) for n, t in self.anchors.items()}
            self.fisher = {n: t.to(device) for n, t in self.fisher.items()}
        return {"ewc": 0.5 * self.penalty_weight * ewc_penalty(module.net.named_parameters(), self.anchors,
                                                               self.fisher)}

    def end_of_stage(self, module: CFSegModule) -> None:
        module.collect_fisher(previous=self.fisher)
