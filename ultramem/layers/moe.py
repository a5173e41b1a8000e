"""Token-choice top-k mixture of experts (docs/math.md §5): softmax gate, Switch-style balance
loss, optional shared experts and router z-loss, fine-grained expert sizes.

Dropless, and with no host synchronisation on the default paths, so a training step captures
in a CUDA graph and compiles without graph breaks. Three ways to apply the experts
(``MoE.path_for`` says which one a forward takes)::

    x [T, D] -> router -> probs [T, E] -> top-k -> gates, experts [T, k]
      "grouped" (T*k large): sort the T*k assignments by expert on device (sort + searchsorted
                 offsets), gather rows, one torch._grouped_mm per projection, gather back
                 token-major, weighted sum over k.
      "gather"  (T*k <= gather_max, decode): no sort; each assignment through its expert,
                 reading only the selected experts' weights (ops.moe_experts: a Triton GEMV
                 at inference, a weight gather + batched matmul when gradients are needed).
      "loop"    (reference): one matmul per expert over its segment; ``counts.tolist()``
                 synchronises with the host, so it is the oracle, not a path for speed.

Permutations are their own autograd functions whose backward is a gather by the inverse
permutation (no atomics, deterministic). Every path computes in the autocast dtype when
autocast is on (the block input is fp32 there), else in the weights' dtype.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ultramem.errors import ConfigError
from ultramem.layers.base import SparseLayer
from ultramem.layers.mlp import MLPConfig
from ultramem.layers.registry import LayerConfig, ShapeContext, register_layer
from ultramem.ops.moe_experts import expert_mlp

IMPLS = ("auto", "grouped_mm", "gather", "loop")


@register_layer("moe")
@dataclass
class MoEConfig(LayerConfig):
    """UltraMem's baseline is "2-in-N" (top_k 2); UltraMemV2's is OLMoE-style 8-of-64 SwiGLU."""

    n_experts: int = 32
    top_k: int = 2
    hidden: int = 2528  # each expert's inner dim
    activation: str = "gelu"  # "gelu" | "swiglu"
    n_shared: int = 0  # shared experts every token uses
    shared_hidden: int = 0  # inner dim of each shared expert (0: same as hidden)
    balance_weight: float = 0.01  # Switch balance loss weight (math.md §5 / §6: 0.01)
    z_loss_weight: float = 0.0  # router z-loss weight (ST-MoE); 0 = off
    normalize_top_k: bool = False  # renormalise the k gate probabilities to sum to 1
    init_std: float = 0.02
    # "auto": "gather" when tokens * top_k <= gather_max, else "grouped_mm" (the loop where this
    # torch build has no usable torch._grouped_mm); the others force one path.
    impl: str = "auto"
    # decode threshold on tokens * top_k (docs/layers.md, MoE): 16 from the block benchmark; 32
    # from whole moe-1.6b decode steps at kv 2048 (docs/results/decode-h200-c.json: 32
    # assignments, gather 16.2 ms vs grouped 17.4; 64: grouped 22.4 vs gather 26.4)
    gather_max: int = 32
    # memory layout of the autocast copy of the expert weights that grouped_mm reads: "row"
    # ([E, K, N] as stored) or "col" (N-major, written by the same cast kernel)
    grouped_layout: str = "row"

    def validate(self, shape: ShapeContext, where: str) -> None:

        for name in ("n_experts", "top_k", "hidden"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be a positive integer")
        if self.top_k > self.n_experts:
            raise ConfigError(
                f"{where}.top_k={self.top_k} exceeds {where}.n_experts={self.n_experts}; "
                "allowed: 1 <= top_k <= n_experts"
            )
        if self.activation not in ("gelu", "swiglu"):
            raise ConfigError(f"{where}.activation={self.activation!r}; allowed: 'gelu', 'swiglu'")
        if self.grouped_layout not in ("row", "col"):
            raise ConfigError(f"{where}.grouped_layout={self.grouped_layout!r}; allowed: 'row', 'col'")
        if self.impl not in IMPLS:
            raise ConfigError(f"{where}.impl={self.impl!r}; allowed: {', '.join(map(repr, IMPLS))}")
        if self.n_shared < 0 or self.balance_weight < 0 or self.z_loss_weight < 0 or self.gather_max < 0:
            raise ConfigError(f"{where}: n_shared, balance_weight, z_loss_weight and gather_max must be >= 0")

    def ffn_shape(self) -> tuple[int, bool]:
        return self.hidden, self.activation == "swiglu"  # each expert's width (math.md §4.5 init)

    def _mats(self) -> int:
        return 3 if self.activation == "swiglu" else 2

    def _shared(self, d: int) -> int:
        return self.n_shared * self._mats() * d * (self.shared_hidden or self.hidden)

    def num_params(self, shape: ShapeContext) -> int:
        d = shape.d_model
        return d * self.n_experts + self.n_experts * self._mats() * d * self.hidden + self._shared(d)

    def active_params(self, shape: ShapeContext) -> int:
        d = shape.d_model
        return d * self.n_experts + self.top_k * self._mats() * d * self.hidden + self._shared(d)

    def flops_per_token(self, shape: ShapeContext) -> int:
        return 2 * self.active_params(shape)

    def build(self, shape: ShapeContext, shared: nn.Module | None = None) -> MoE:
        return MoE(self, shape)


# ---- routing ---------------------------------------------------------------------------------
def route(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[T, E]`` logits -> ``(probs [T, E], gates [T, k], experts [T, k])`` (fp32 softmax)."""
    probs = router_logits.float().softmax(-1)
    gates, experts = probs.topk(top_k, dim=-1)
    if normalize:
        gates = gates / gates.sum(-1, keepdim=True)
    return probs, gates, experts


def expert_counts(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """``experts [T, k]`` -> assignments per expert ``[E]`` (int64). A scatter-add, not
    ``torch.bincount``, whose CUDA kernel reads the maximum back to the host."""
    flat = experts.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def switch_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer balance loss generalised to top-k: ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the T*k assignments that go to expert e, ``P_e`` the mean router
    probability of e over tokens. Equals 1 for perfectly uniform routing.
    ``probs: [T, E]``, ``topk_idx: [T, k]``.
    """
    f = expert_counts(topk_idx, n_experts).to(probs.dtype) / topk_idx.numel()
    return n_experts * (f * probs.mean(0)).sum()


class Dispatch(NamedTuple):
    """The T*k assignments sorted by expert (all ``[N = T*k]`` int64 except ``offs``)."""

    order: torch.Tensor  # sorted position -> flat assignment index (t * k + j)
    inverse: torch.Tensor  # flat assignment index -> sorted position
    token_of: torch.Tensor  # sorted position -> token
    counts: torch.Tensor  # [E] assignments per expert
    offs: torch.Tensor  # [E] int32 end of each expert's segment (torch._grouped_mm's offs)


def dispatch(experts: torch.Tensor, n_experts: int) -> Dispatch:
    """``experts [T, k]`` -> :class:`Dispatch`, on device: a stable sort, segment ends by
    ``searchsorted`` over the sorted ids, the inverse permutation by a scatter."""
    flat = experts.flatten()
    sorted_ids, order = flat.sort(stable=True)
    ids = torch.arange(n_experts, device=flat.device, dtype=flat.dtype)
    offs = torch.searchsorted(sorted_ids, ids, right=True, out_int32=True)
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).long()
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=flat.device))
    return Dispatch(order, inverse, torch.div(order, experts.shape[1], rounding_mode="floor"), counts, offs)


def sort_by_expert(experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``experts [T, k]`` -> ``(order [T*k], token_of [T*k], counts [E])`` (see :func:`dispatch`)."""
    d = dispatch(experts, n_experts)
    return d.order, d.token_of, d.counts


class _Rows(torch.autograd.Function):
    """``y = x[index]`` whose backward is ``g[back]`` summed over ``group`` consecutive rows.

    Valid when ``index`` maps each output row to one input row and every input row is read by
    exactly ``group`` consecutive entries of ``back`` (a permutation: group 1; the dispatch of
    a token to its k experts: group k). A gather both ways: no atomics, deterministic."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, back: torch.Tensor, group: int) -> torch.Tensor:
        ctx.save_for_backward(back)
        ctx.group = group
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (back,) = ctx.saved_tensors
        gx = g.index_select(0, back)
        if ctx.group > 1:
            gx = gx.view(-1, ctx.group, g.shape[-1]).sum(1)
        return gx, None, None, None


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build runs ``torch._grouped_mm`` forward and backward for ``dtype`` on
    ``device``'s type (probed once per pair with a tiny product; CUDA needs sm80+)."""
    key = (device.type, dtype)
    if torch.compiler.is_compiling():  # traced after an eager call has filled the cache
        return _GROUPED_OK.get(key, hasattr(torch, "_grouped_mm"))
    if key not in _GROUPED_OK:
        ok = hasattr(torch, "_grouped_mm") and dtype in (torch.bfloat16, torch.float32, torch.float16)
        if ok and device.type == "cuda":
            ok = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
        elif ok:
            try:
                a = torch.ones(4, 8, device=device, dtype=dtype, requires_grad=True)
                w = torch.ones(2, 8, 8, device=device, dtype=dtype, requires_grad=True)
                offs = torch.tensor([1, 4], device=device, dtype=torch.int32)
                torch._grouped_mm(a, w, offs=offs).backward(torch.ones(4, 8, device=device, dtype=dtype))
            except (RuntimeError, NotImplementedError):
                ok = False
        _GROUPED_OK[key] = ok
    return _GROUPED_OK[key]


# ---- the layer -------------------------------------------------------------------------------
class MoE(SparseLayer):
    """``[B, S, D] -> [B, S, D]``; expert weights ``w_up/w_gate [E, D, h]``, ``w_down [E, h, D]``."""

    def __init__(self, cfg: MoEConfig, shape: ShapeContext) -> None:
        super().__init__()
        self.cfg, self.n_layers = cfg, shape.n_layers
        d, e, h = shape.d_model, cfg.n_experts, cfg.hidden
        self.router = nn.Linear(d, e, bias=False)
        self.w_up = nn.Parameter(torch.empty(e, d, h))
        self.w_gate = nn.Parameter(torch.empty(e, d, h)) if cfg.activation == "swiglu" else None
        self.w_down = nn.Parameter(torch.empty(e, h, d))
        self.shared_experts = None
        if cfg.n_shared:
            mlp = MLPConfig(hidden=cfg.n_shared * (cfg.shared_hidden or h), activation=cfg.activation, init_std=cfg.init_std)
            self.shared_experts = mlp.build(shape)

    def init_weights(self) -> None:
        std = self.cfg.init_std
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.w_up, std=std)
        if self.w_gate is not None:
            nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_down, std=std / math.sqrt(2 * self.n_layers))
        if self.shared_experts is not None:
            self.shared_experts.init_weights()

    def path_for(self, n_tokens: int, device: torch.device, dtype: torch.dtype) -> str:
        """The path a forward over ``n_tokens`` tokens takes: "grouped", "gather" or "loop"."""
        impl = self.cfg.impl
        if impl == "gather" or (impl == "auto" and n_tokens * self.cfg.top_k <= self.cfg.gather_max):
            return "gather"
        if impl == "loop":
            return "loop"
        why = None if grouped_mm_available(device, dtype) else f"this torch build has no torch._grouped_mm for {dtype} on {device.type}"
        if why is None:
            # torch._grouped_mm needs 16-byte row strides: d_model and hidden a multiple of 16 bytes
            step = 16 // dtype.itemsize
            bad = [f"{n}={v}" for n, v in (("d_model", self.w_up.shape[1]), ("hidden", self.cfg.hidden)) if v % step]
            if not bad:
                return "grouped"
            why = (f"torch._grouped_mm needs widths that are multiples of {step} in {dtype} ({', '.join(bad)}; "
                   f"pick multiples of {step})")
        if impl == "grouped_mm":
            raise ConfigError(f"moe.impl='grouped_mm' but {why}; use impl='auto'")
        warnings.warn(f"MoE: {why}; using the per-expert loop (synchronises with the host)", stacklevel=3)
        return "loop"

    def _mlp(self, x: torch.Tensor, w_up: torch.Tensor, w_gate: torch.Tensor | None, w_down: torch.Tensor, mm) -> torch.Tensor:
        h = mm(x, w_up)
        h = F.silu(mm(x, w_gate)) * h if w_gate is not None else F.gelu(h)
        return mm(h, w_down)

    def _weights(self, dtype: torch.dtype) -> tuple:
        """``(w_up, w_gate, w_down)`` in ``dtype`` (the autocast cast, explicit); with
        ``grouped_layout="col"`` the cast writes each ``[K, N]`` matrix N-major."""
        col = self.cfg.grouped_layout == "col"

        def cast(w: torch.Tensor | None) -> torch.Tensor | None:
            if w is None or w.dtype == dtype:
                return w
            return w.mT.to(dtype, memory_format=torch.contiguous_format).mT if col else w.to(dtype)

        return cast(self.w_up), cast(self.w_gate), cast(self.w_down)

    def _grouped(self, xs: torch.Tensor, d: Dispatch) -> torch.Tensor:
        """``xs [N, D]`` sorted by expert -> ``[N, D]``: one ``torch._grouped_mm`` per projection."""
        return self._mlp(xs, *self._weights(xs.dtype), lambda a, w: torch._grouped_mm(a, w, offs=d.offs))

    def _loop(self, xs: torch.Tensor, d: Dispatch) -> torch.Tensor:
        """Reference: one matmul per expert over its contiguous segment (host sync on counts)."""
        w_up, w_gate, w_down = self._weights(xs.dtype)
        outs = [
            self._mlp(seg, w_up[e], None if w_gate is None else w_gate[e], w_down[e], torch.matmul)
            for e, seg in enumerate(xs.split(d.counts.tolist()))
        ]
        return torch.cat(outs)

    def _gathered(self, flat: torch.Tensor, gates: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Decode path: ``[T, D]`` -> ``[T, D]`` reading only the selected experts' weights
        (``ops.moe_experts``: a Triton GEMV that reads them once when no gradient is needed,
        else the differentiable gather + batched matmul)."""
        ys = expert_mlp(flat, experts, self.w_up, self.w_gate, self.w_down)  # [T, k, D]
        return (ys * gates.unsqueeze(-1).to(ys.dtype)).sum(1)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        shape = x.shape
        dtype = _compute_dtype(x, self.w_up)
        flat = x.reshape(-1, shape[-1]).to(dtype)  # [T, D]
        logits = self.router(flat)
        probs, gates, experts = route(logits, self.cfg.top_k, self.cfg.normalize_top_k)
        if self.training and self.cfg.balance_weight > 0:
            self.add_aux_loss("balance", self.cfg.balance_weight * switch_balance_loss(probs, experts, self.cfg.n_experts))
        if self.training and self.cfg.z_loss_weight > 0:
            self.add_aux_loss("z_loss", self.cfg.z_loss_weight * torch.logsumexp(logits.float(), -1).pow(2).mean())
        path = self.path_for(flat.shape[0], flat.device, dtype)
        if path == "gather":
            out = self._gathered(flat, gates, experts)
        else:
            d = dispatch(experts, self.cfg.n_experts)
            xs = _Rows.apply(flat, d.token_of, d.inverse, self.cfg.top_k)  # [T*k, D] by expert
            ys = self._grouped(xs, d) if path == "grouped" else self._loop(xs, d)
            ys = _Rows.apply(ys, d.inverse, d.order, 1).view(*experts.shape, -1)  # [T, k, D]
            out = (ys * gates.unsqueeze(-1).to(ys.dtype)).sum(1)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        if self.track_metrics:
            load = expert_counts(experts, self.cfg.n_experts).float() / experts.numel()
            self.add_metric("load_max", load.max() * self.cfg.n_experts)
            self.add_metric("router_entropy", -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean())
        return out.view(shape)
