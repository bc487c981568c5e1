"""LoRA experts on a frozen network: parameter isolation for continual learning.

Stage 0 trains the whole network; from stage 1 on the shared weights stay frozen and every stage trains one new
*expert*: a low-rank update ``dW_e = (alpha / r) * U_e D_e`` of chosen ``Conv3d`` / ``ConvTranspose3d`` weights
(LoRA, Hu et al. 2022, brought to 3D convolutions; EvoSAM, Liu et al. 2025, puts one per task on a frozen SAM).
``U_e`` starts at zero, so a new expert starts as the identity change. With a prototype head each expert also
owns a copy of the projection ``W [D, F]`` (:class:`ExpertProjection`, ``D * F`` parameters): new classes'
prototypes lie mostly outside the range of the stage-0 ``W`` (on OpenKBP the stage-1/2 organs' prototypes keep
12-22 % of their norm in it, so no decoder change could raise their cosine logits above about 0.2).
Expert 0 is the shared network itself (no update); expert ``e >= 1`` lives in slot ``e - 1`` of every :class:`LoRAConv`.

A wrapped layer keeps the original ``weight`` and ``bias`` parameters under their original names, so a checkpoint
of the plain network loads into the wrapped one (``strict=False`` for the missing expert tensors) and the expert
tensors appear as ``<layer>.lora_down.<slot>`` / ``<layer>.lora_up.<slot>``.

Which layers carry experts is a list of regular expressions over the segmenter's module names
(:data:`DEFAULT_EXPERT_LAYERS`: every convolution, so an expert can also change what the encoder reads from a new
modality). When only the decoder carries experts (:data:`DECODER_EXPERT_LAYERS`), the encoder's output does not
depend on the expert: :func:`shared_prefix_cache` runs it once per window for all experts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfseg.continual.pod import resolve_layers
from cfseg.continual.strategy import Strategy
from cfseg.nets import CONV_TYPES as _CONVS

if TYPE_CHECKING:  # the module holds the strategy; annotations only
    from cfseg.module import CFSegModule

#: MONAI UNet's up-sampling (decoder) convolutions: ``model.2.conv``, ``model.1.submodule.2.conv``, ... as named
#: under the segmenter (``backbone.`` prefix).
DECODER_EXPERT_LAYERS: tuple[str, ...] = (r"backbone\.model(\.1\.submodule)*\.2\.conv",)
#: every convolution of the backbone (encoder and decoder)
EVERY_CONV_LAYERS: tuple[str, ...] = (r"backbone\..*conv",)
DEFAULT_EXPERT_LAYERS: tuple[str, ...] = EVERY_CONV_LAYERS
#: rank (and alpha: scale 1) of a new expert when neither the settings nor the previous checkpoint name one
DEFAULT_EXPERT_RANK = 16


class LoRAConv(nn.Module):
    """A convolution (plain or transposed, 1-3D) with a bank of low-rank weight updates, one active at a time.

    Args:
        conv: the layer to wrap; its ``weight`` / ``bias`` parameters are reused (not copied).
        rank: ``r``, the rank of each expert's update.
        alpha: scale numerator: the update is ``(alpha / r) * U @ D`` reshaped to the weight's shape.

    The weight ``[R, *rest]`` (``R``: out channels of a convolution, in channels of a transposed one) gets
    ``U [R, r]`` (zero-initialised) and ``D [r, prod(rest)]`` (Kaiming-uniform, as LoRA's down-projection).
    """

    def __init__(self, conv: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        if not isinstance(conv, _CONVS):
            raise ValueError(f"LoRA experts wrap convolutions; got {type(conv).__name__}")
        if getattr(conv, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"LoRA experts need padding_mode='zeros', got {conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            raise ValueError("LoRA experts need numeric padding (got padding={conv.padding!r})")
        if not (isinstance(rank, int) and rank >= 1) or not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"need an integer rank >= 1 and alpha > 0, got rank={rank!r}, alpha={alpha!r}")
        self.weight = conv.weight
        self.bias = conv.bias
        self.transposed = isinstance(conv, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
        self.dims = conv.weight.dim() - 2
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.output_padding = getattr(conv, "output_padding", 0)
        self.rank, self.alpha = rank, float(alpha)
        self.lora_down = nn.ParameterList()
        self.lora_up = nn.ParameterList()
        self.active = 0
        self._merged: dict[int, tuple[tuple[int, ...], Tensor]] = {}

    @property
    def n_experts(self) -> int:
        """Experts including expert 0 (the shared weights)."""
        return 1 + len(self.lora_up)

    def add_expert(self, init_from: int | None = None) -> int:
        """Append an expert (zero update, or a copy of expert ``init_from``'s factors); returns its index."""
        rows, fan = self.weight.shape[0], self.weight[0].numel()
        w = self.weight
        if init_from:  # a copy of an earlier expert (expert 0 has no factors: zero update)
            down = self.lora_down[init_from - 1].detach().clone()
            up = self.lora_up[init_from - 1].detach().clone()
        else:
            down = torch.empty(self.rank, fan, dtype=w.dtype, device=w.device)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            up = torch.zeros(rows, self.rank, dtype=w.dtype, device=w.device)
        self.lora_down.append(nn.Parameter(down))
        self.lora_up.append(nn.Parameter(up))
        return self.n_experts - 1

    def delta(self, expert: int) -> Tensor:
        """The weight update of ``expert`` (zeros for expert 0), shaped like ``weight``."""
        if not 0 <= expert < self.n_experts:
            raise ValueError(f"expert {expert} does not exist (this layer has experts 0..{self.n_experts - 1})")
        if expert == 0:
            return torch.zeros_like(self.weight)
        up, down = self.lora_up[expert - 1], self.lora_down[expert - 1]
        return ((self.alpha / self.rank) * (up @ down)).view_as(self.weight)

    def merged_weight(self, expert: int | None = None) -> Tensor:
        """``weight + delta(expert)`` (the active expert by default); cached outside training and autograd."""
        e = self.active if expert is None else expert
        if e == 0:
            return self.weight
        if self.training or torch.is_grad_enabled():
            return self.weight + self.delta(e)
        version = (self.weight._version, self.lora_up[e - 1]._version, self.lora_down[e - 1]._version,
                   self.weight.data_ptr())
        hit = self._merged.get(e)
        if hit is None or hit[0] != version:
            hit = (version, (self.weight + self.delta(e)).detach())
            self._merged[e] = hit
        return hit[1]

    def forward(self, x: Tensor) -> Tensor:
        """The convolution with the active expert's weights. x [B, C_in, *S] -> [B, C_out, *S']."""
        _PrefixState.notify_expert_layer(self)
        w = self.merged_weight()
        if self.transposed:
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.dims - 1]
            return fn(x, w, self.bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation)
        fn = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        return fn(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        kind = "transposed " if self.transposed else ""
        return f"{kind}conv{self.dims}d {tuple(self.weight.shape)}, rank={self.rank}, alpha={self.alpha}, " \
               f"experts={self.n_experts}"


class ExpertProjection(nn.Module):
    """Per-expert copies of a prototype head's projection ``W [D, F']``; expert 0 uses the shared ``W``.

    The shared parameter is referenced, not registered (it stays ``head.weight`` in the state dict); copies are
    ``copies.<slot>``.
    """

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self._shared = [weight]
        self.copies = nn.ParameterList()
        self.active = 0

    @property
    def n_experts(self) -> int:
        return 1 + len(self.copies)

    def add_expert(self, init_from: int | None = None) -> int:
        """Append a copy of expert ``init_from``'s projection (the shared one by default); returns its index."""
        self.copies.append(nn.Parameter(self.weight(init_from or 0).detach().clone()))
        return self.n_experts - 1

    def weight(self, expert: int | None = None) -> Tensor:
        """The projection of ``expert`` (the active one by default), ``[D, F']``."""
        e = self.active if expert is None else expert
        if not 0 <= e < self.n_experts:
            raise ValueError(f"expert {e} does not exist (experts 0..{self.n_experts - 1})")
        return self._shared[0] if e == 0 else self.copies[e - 1]

    def expert_parameters(self, expert: int) -> list[nn.Parameter]:
        return [self.copies[expert - 1]]


def resolve_expert_layers(net: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of ``net``'s convolutions (or already wrapped layers) fully matching any of ``patterns``.

    Raises:
        ValueError: an invalid regex, or a pattern that matches no convolution (some names are listed).
    """
    wrapped = [n for n, m in net.named_modules() if isinstance(m, LoRAConv)]
    convs = [n for n, m in net.named_modules() if isinstance(m, (*_CONVS, LoRAConv))
             and not any(n.startswith(w + ".") for w in wrapped)]
    return resolve_layers(net, patterns, "expert_layers", convs, what="convolution")


def attach_lora(net: nn.Module, patterns: Sequence[str], rank: int, alpha: float,
                projection: bool = False) -> list[str]:
    """Wrap the convolutions of ``net`` matching ``patterns`` in :class:`LoRAConv` (in place; idempotent).

    ``projection``: also give every expert its own copy of a prototype head's projection (``net`` must have an
    ``expert_projection`` slot and a ``head.weight``, as :class:`cfseg.nets.PrototypeSegmenter`).

    Returns:
        the wrapped layers' names.
    """
    if projection:
        if not hasattr(net, "expert_projection") or not isinstance(getattr(net.head, "weight", None), nn.Parameter):
            raise ValueError(f"{type(net).__name__} has no prototype projection for experts (projection=True needs "
                             "a prototype head)")
        if net.expert_projection is None:
            net.expert_projection = ExpertProjection(net.head.weight)
    names = resolve_expert_layers(net, patterns)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        layer = getattr(parent, child)
        if not isinstance(layer, LoRAConv):
            setattr(parent, child, LoRAConv(layer, rank, alpha))
    return names


def lora_layers(net: nn.Module) -> dict[str, LoRAConv | ExpertProjection]:
    """``{name: layer}`` of every layer of ``net`` carrying experts (:class:`LoRAConv`, :class:`ExpertProjection`)."""
    return {n: m for n, m in net.named_modules() if isinstance(m, (LoRAConv, ExpertProjection))}


def n_experts(net: nn.Module) -> int:
    """Experts of ``net`` including expert 0 (1 when it carries no LoRA layer)."""
    counts = {m.n_experts for m in lora_layers(net).values()}
    if len(counts) > 1:
        raise ValueError(f"LoRA layers disagree on the number of experts: {sorted(counts)}")
    return counts.pop() if counts else 1


def add_expert(net: nn.Module, init_from: int | None = None) -> int:
    """Append one expert to every LoRA layer of ``net`` (see :meth:`LoRAConv.add_expert`); returns its index."""
    layers = lora_layers(net)
    if not layers:
        raise ValueError("the network carries no LoRA layers: call attach_lora first")
    if init_from is not None and not 0 <= init_from < n_experts(net):
        raise ValueError(f"cannot initialise from expert {init_from}: the network has {n_experts(net)} experts")
    return [m.add_expert(init_from) for m in layers.values()][0]


def set_active_expert(net: nn.Module, expert: int) -> None:
    """Make ``expert`` (0: the shared weights) the one every LoRA layer of ``net`` applies."""
    if not 0 <= expert < n_experts(net):
        raise ValueError(f"expert {expert} does not exist (experts 0..{n_experts(net) - 1})")
    for m in lora_layers(net).values():
        m.active = expert


@contextmanager
def active_expert(net: nn.Module, expert: int) -> Iterator[None]:
    """Apply ``expert`` inside the block, then restore the previously active one."""
    layers = lora_layers(net)
    before = next(iter(layers.values())).active if layers else 0
    set_active_expert(net, expert)
    try:
        yield
    finally:
        set_active_expert(net, before)


def expert_parameters(net: nn.Module, expert: int) -> list[nn.Parameter]:
    """The trainable factors of ``expert`` (>= 1) across all LoRA layers."""
    if not 1 <= expert < n_experts(net):
        raise ValueError(f"expert {expert} has no LoRA factors (experts with factors: 1..{n_experts(net) - 1})")
    return [p for m in lora_layers(net).values() for p in
            (m.expert_parameters(expert) if isinstance(m, ExpertProjection)
             else (m.lora_down[expert - 1], m.lora_up[expert - 1]))]


def expert_parameter_count(net: nn.Module, rank: int, patterns: Sequence[str], projection: bool = False) -> int:
    """Parameters one expert adds to ``net`` for the layers ``patterns`` select (sum of r * (R + prod(rest))), plus
    the projection's ``D * F'`` with ``projection``."""
    mods = dict(net.named_modules())
    head = net.head.weight.numel() if projection else 0
    return head + sum(rank * (mods[n].weight.shape[0] + mods[n].weight[0].numel())
                      for n in resolve_expert_layers(net, patterns))


# ---- running the expert-independent part of a network once per input ------------------------------------------
class _PrefixState:
    """Shared state of :func:`shared_prefix_cache` (one active cache per process at a time)."""

    current: _PrefixState | None = None

    def __init__(self) -> None:
        self.input: Tensor | None = None  # held, so that no other tensor can take its place in memory
        self.version = -1
        self.outputs: list[tuple[nn.Module, Any]] = []
        self.calls = 0
        self.expert_seen = False
        self.hits = 0

    @classmethod
    def notify_expert_layer(cls, _layer: LoRAConv) -> None:
        if cls.current is not None:
            cls.current.expert_seen = True


def _prefix_candidates(net: nn.Module) -> list[nn.Module]:
    """The largest submodules of ``net`` without a LoRA layer inside (children of modules that have one)."""
    def has_lora(m: nn.Module) -> bool:
        return any(isinstance(s, LoRAConv) for s in m.modules())

    out: list[nn.Module] = []
    stack = [net]
    while stack:
        m = stack.pop()
        for child in m.children():
            if isinstance(child, LoRAConv):
                continue
            (stack.append(child) if has_lora(child) else out.append(child))
    return out


@contextmanager
def shared_prefix_cache(net: nn.Module) -> Iterator[_PrefixState]:
    """Inside the block, forward passes of ``net`` on the same input tensor reuse the outputs of the modules that
    run before the first LoRA layer (the expert-independent prefix: a UNet's encoder when only its decoder carries
    experts), so running every expert on one window costs one encoder pass.

    Only under ``torch.no_grad()`` (inference); with gradients enabled every module runs normally. A pass is
    recognised by the identity (the cache holds a reference to it) and version of its input tensor; any other
    input starts a new cache. Apply it to the module that receives the image (a segmenter's backbone).
    """
    state = _PrefixState()
    mods = _prefix_candidates(net)

    def pre_hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x is not state.input or x._version != state.version:
            state.input, state.outputs = (x if isinstance(x, Tensor) else None), []
            state.version = x._version if isinstance(x, Tensor) else -1
        state.calls, state.expert_seen = 0, False

    def wrap(m: nn.Module):
        original = m.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled() or state.expert_seen or state.input is None:
                return original(*args, **kwargs)
            i = state.calls
            state.calls += 1
            if i < len(state.outputs) and state.outputs[i][0] is m:
                state.hits += 1
                return state.outputs[i][1]
            out = original(*args, **kwargs)
            del state.outputs[i:]
            state.outputs.append((m, out))
            return out
        return forward

    handle = net.register_forward_pre_hook(pre_hook)
    previous = _PrefixState.current
    _PrefixState.current = state
    for m in mods:
        m.forward = wrap(m)
    try:
        yield state
    finally:
        handle.remove()
        for m in mods:
            del m.forward  # back to the class's forward
        _PrefixState.current = previous


EXPERT_INITS = ("previous", "zero")


class Experts(Strategy):
    """Parameter isolation: the previous stage's network stays frozen and this stage trains one new LoRA expert,
    which serves the stage's classes in the stage's domains (chosen per volume by the analytic router at
    inference; :mod:`cfseg.continual.routing`).

    Args:
        layers: regular expressions (full match) of the segmenter's convolutions that carry experts. Every stage of
            a model keeps the same layout: unset, a checkpoint that already carries experts keeps its own, a first
            expert sits on :data:`DEFAULT_EXPERT_LAYERS` (every convolution;
            :data:`DECODER_EXPERT_LAYERS` is the cheaper decoder-only layout).
        rank: rank ``r`` of each expert's weight update (unset: the checkpoint's, else
            :data:`DEFAULT_EXPERT_RANK`).
        alpha: LoRA scale numerator (the update is ``alpha / r * U D``; unset: the checkpoint's, else ``rank``).
        init: ``"previous"`` (a new expert starts as a copy of the previous stage's expert) or ``"zero"`` (as no
            change of the shared weights).
        projection: every expert also owns a copy of the prototype projection ``W`` (:class:`ExpertProjection`).
        lr_factor: multiplies the stage's learning rate while the expert trains (its factors start at zero and are
            few, so they can take a larger step than the whole network).
    """

    short_name = "experts"
    requires_previous = True
    softmax_only = True

    def __init__(self, layers: list[str] | None = None, rank: int | None = None, alpha: float | None = None,
                 init: str = "previous", projection: bool = True, lr_factor: float = 4.0):
        if init not in EXPERT_INITS:
            raise ValueError(f"init must be one of {EXPERT_INITS}, got {init!r}")
        if isinstance(lr_factor, bool) or not isinstance(lr_factor, int | float) or not (
                math.isfinite(lr_factor) and lr_factor > 0):
            raise ValueError(f"lr_factor must be a finite number > 0, got {lr_factor!r}")
        self.layers, self.rank, self.alpha, self.init, self.projection = layers, rank, alpha, init, projection
        self.lr_factor = float(lr_factor)
        self.expert: int | None = None

    def layout(self, module: CFSegModule, previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """The LoRA layout these settings give on ``module`` (a projection only for a head with a ``weight``);
        settings left unset take ``previous`` (a checkpoint's layout), else the defaults."""
        previous = previous or {}
        rank = self.rank if self.rank is not None else previous.get("rank", DEFAULT_EXPERT_RANK)
        alpha = self.alpha if self.alpha is not None else previous.get("alpha", rank)
        return {"layers": list(self.layers or previous.get("layers") or DEFAULT_EXPERT_LAYERS), "rank": int(rank),
                "alpha": float(alpha),
                "projection": bool(self.projection) and isinstance(getattr(module.head, "weight", None),
                                                                   nn.Parameter)}

    def setup(self, module: CFSegModule, teacher: CFSegModule) -> None:
        """Freeze the teacher's network (already in ``module``) and add this stage's expert."""
        layout = self.layout(module, teacher.expert_layout)
        if teacher.expert_layout is not None and teacher.expert_layout != layout:
            raise ValueError(f"the previous checkpoint's experts sit on {teacher.expert_layout}, this stage asks "
                             f"for {layout}; keep the experts' layers/rank/alpha across stages (or leave them "
                             "unset)")
        if module.expert_layout is None:
            module.attach_experts(layout, 1)
        previous = n_experts(module.net) - 1
        new = add_expert(module.net, previous if self.init == "previous" else None)
        for p in module.net.parameters():
            p.requires_grad_(False)
        for p in expert_parameters(module.net, new):
            p.requires_grad_(True)
        set_active_expert(module.net, new)
        self.expert = new
        if module.router is None and module.statistics.router_batches > 0:
            warnings.warn("the previous checkpoint has no router statistics for its expert(s): volumes cannot be "
                          "routed between domains (class-incremental experts still serve their classes); train "
                          "stage 0 with model.statistics.router_batches > 0 for domain routing", stacklevel=3)

    def after_train_mode(self, module: CFSegModule) -> None:
        """The frozen network's batch-norm statistics stay fixed while the expert trains."""
        if self.expert is None:
            return
        for m in module.net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def records_expert(self, module: CFSegModule) -> int | None:
        return self.expert

    def end_of_stage(self, module: CFSegModule) -> None:
        """Router statistics of this stage's images for its expert."""
        module.collect_router_statistics(expert=module.n_experts - 1)
