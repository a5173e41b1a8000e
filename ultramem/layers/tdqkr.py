"""The one product-key retrieval module: UltraMem (math.md §3), UltraMemV2 (math.md §4), and
PKM / Memory+ (math.md §2, §5), whose product keys are TDQKR with the Tucker core off
(``tucker_rank = 0``: one sub-key per key, sum scores; tests/layers/test_tdqkr.py proves it).

- :class:`RetrievalSpec` -- sizes of the query/key side and its parameter and MAC counts
  (accounting without weights).
- :class:`CausalQueryConv` -- causal depthwise 1-D conv over the sequence before the query
  projection, with a rolling decode state (math.md §3.11).
- :class:`TuckerCores` -- the ``h_c`` Tucker cores ``[h_c, r, r]`` (``[H, h_c, r, r]`` with
  ``tucker_per_head``, as the authors' code), their rank-1 approximation ``u, v`` refreshed once
  per optimiser step with sign stability, and the singular-value aux loss (math.md §3.7, §3.8).
- :class:`MemoryRetrieval` -- ``x [T, D] -> (scores [T, H, m, h_c], addr [T, H, m])``: query
  projection (heads may share queries in pairs, math.md §3.3), query/key norm (math.md §3.5),
  per-head keys with ``r`` sub-keys each, then the ``product_key_topk`` (plain sum scores, math.md
  §2) or ``tucker_topk`` (math.md §3.7) op. Only the ops in :mod:`ultramem.ops.retrieval` select.
- :func:`calibrate_gains` -- Appendix-A init: set the query/key norm gains so that the mean
  selected score is 1, measured by running the retrieval once on a sample of ``N(0, I)`` inputs.
- :class:`ProductKeyMemoryConfig`, :func:`product_key_spec` -- the PKM / Memory+ configs' shared
  validation and their :class:`RetrievalSpec`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ultramem.errors import ConfigError
from ultramem.layers.norm import make_norm
from ultramem.layers.registry import MemoryLayerConfig, ShapeContext
from ultramem.layers.state import LayerState
from ultramem.ops.key_scores import key_scores
from ultramem.ops.retrieval import product_key_topk, tucker_topk
from ultramem.ops.skinny_linear import skinny_linear

QUERY_NORMS = ("none", "batchnorm", "layernorm", "rmsnorm")
KEY_NORMS = ("none", "layernorm", "rmsnorm")
PK_QUERY_NORMS = ("batchnorm", "layernorm", "none")  # the PKM / Memory+ query norms (Lample et al.)


@dataclass(frozen=True)
class RetrievalSpec:
    """Sizes of one layer's retrieval. ``tucker_rank = 0`` means plain product-key sum scores."""

    d_model: int
    heads: int  # H
    share_query: bool  # heads share queries in pairs (head i uses query i // 2)
    key_dim: int  # K per side
    n_keys: int  # N keys per side
    tucker_rank: int  # r (0: product-key sum scoring)
    per_rank_query: bool  # a separate K-dim query per rank
    cores: int  # h_c
    query_norm: str
    key_norm: str
    topk: int  # m per head
    k: int  # phase-1 candidates per side
    query_conv: int  # causal conv kernel (0: off)
    tucker_per_head: bool = False  # one set of h_c cores (and u, v) per head (authors' code)

    @property
    def n_queries(self) -> int:
        return self.heads // 2 if self.share_query else self.heads

    @property
    def sub_keys(self) -> int:
        return max(self.tucker_rank, 1)

    @property
    def query_ranks(self) -> int:
        return self.tucker_rank if self.per_rank_query and self.tucker_rank > 0 else 1

    @property
    def query_out(self) -> int:
        return self.n_queries * 2 * self.query_ranks * self.key_dim

    def params(self) -> int:
        kd = self.key_dim
        qn = {"none": 0, "batchnorm": 2 * self.query_out, "layernorm": 2 * kd, "rmsnorm": kd}[self.query_norm]
        kn = {"none": 0, "layernorm": 2 * kd, "rmsnorm": kd}[self.key_norm]
        keys = self.heads * 2 * self.n_keys * self.sub_keys * kd
        per_set = self.cores * self.tucker_rank**2 if self.tucker_rank else 0
        cores = per_set * (self.heads if self.tucker_per_head else 1)
        conv = self.d_model * self.query_conv
        return conv + self.d_model * self.query_out + qn + keys + kn + cores

    def macs(self) -> int:
        """Per token: conv, query projection, key scores, phase-1 rank-1 mix and Tucker grid."""
        h, n, r, k = self.heads, self.n_keys, self.tucker_rank, self.k
        macs = self.d_model * self.query_conv + self.d_model * self.query_out
        macs += h * 2 * n * self.sub_keys * self.key_dim
        if r:
            macs += h * 2 * n * r  # S u, S v
            macs += h * k * k * self.cores * (r * r + r)  # exact bilinear rescoring of k x k
        return macs


class CausalQueryConv(nn.Module):
    """Depthwise causal conv ``[B, S, D] -> [B, S, D]`` (math.md §3.11); token t sees only <= t.

    Initialised to the identity (weight 1 on the current token), so switching it on does not
    change the layer at init. Decoding: ``state.window`` keeps the last ``kernel - 1`` inputs.
    """

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.zero_()
        self.weight[:, 0, -1] = 1.0

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> LayerState:
        """A zeroed rolling window ``[batch, D, kernel - 1]`` for decoding."""
        return LayerState(torch.zeros(batch, self.weight.shape[0], self.kernel - 1, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, state: LayerState | None = None) -> torch.Tensor:
        xt = x.transpose(1, 2)  # [B, D, S]
        pad = self.kernel - 1
        if state is None or state.window is None:
            if state is not None:
                raise ValueError("CausalQueryConv: decode state has no window; build it with new_state()")
            xin = F.pad(xt, (pad, 0))
        else:
            xin = torch.cat([state.window.to(xt.dtype), xt], dim=-1)  # [B, D, pad + S]
            if pad:
                # The new window ends at each sequence's last valid token (right-padded input);
                # a gather, not a Python slice, so ragged lengths need no host sync.
                valid = xt.shape[-1] if state.lengths is None else state.lengths.view(-1, 1, 1)
                idx = torch.arange(pad, device=x.device).view(1, 1, pad) + valid
                idx = idx.expand(xin.shape[0], xin.shape[1], pad)
                state.window.copy_(xin.gather(-1, idx).detach())
        y = F.conv1d(xin, self.weight.to(x.dtype), groups=xt.shape[1])
        return y.transpose(1, 2)


class TuckerCores(nn.Module):
    """``cores [h_c, r, r]``; buffers ``u, v [r]`` = leading singular vectors of ``cores.sum(0)``.

    With ``heads`` (``tucker_per_head``, math.md §3.7): one set per head, ``cores [H, h_c, r, r]``
    and ``u, v [H, r]`` from each head's summed core, as the authors' code. ``u, v`` carry no
    gradient and change only in :meth:`refresh` (once per optimiser step); their sign is chosen
    closest to the previous one (per head) so phase-1 selection does not flip.
    """

    def __init__(self, cores: int, rank: int, heads: int = 0) -> None:
        super().__init__()
        lead = (heads,) if heads else ()
        self.per_head = bool(heads)
        self.cores = nn.Parameter(torch.empty(*lead, cores, rank, rank))
        self.register_buffer("u", torch.empty(*lead, rank))
        self.register_buffer("v", torch.empty(*lead, rank))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init (paper): a shared N(0, 1/r) base plus a small per-core part, so the cores
        start similar and each core's score is about 1/h_c of the selection score. Per head: an
        independent draw of the same for each head."""
        *lead, h_c, r, _ = self.cores.shape
        base = torch.randn(*lead, 1, r, r) / math.sqrt(r) if lead else torch.randn(r, r) / math.sqrt(r)
        noise = 0.1 * torch.randn(*lead, h_c, r, r) / math.sqrt(r)
        self.cores.copy_((base + noise) / h_c)
        self.u.zero_()
        self.v.zero_()
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute ``u, v`` from the summed core(s) (r x r SVD, batched over heads), keeping
        the previous sign."""
        c = self.cores.detach()
        if hasattr(c, "full_tensor"):  # a DTensor shard under FSDP2: every rank needs the whole core
            c = c.full_tensor()
        c = c.float().sum(-3)  # [(H,) r, r]
        uu, _, vh = torch.linalg.svd(c)
        u, v = uu[..., :, 0], vh[..., 0, :]  # [(H,) r]
        prev = (self.u.float() * u).sum(-1) + (self.v.float() * v).sum(-1)
        lead = u.gather(-1, u.abs().argmax(-1, keepdim=True)).squeeze(-1)  # largest entry of u
        flip = (prev < 0) | ((prev == 0) & (lead < 0))
        sign = 1.0 - 2.0 * flip.float().unsqueeze(-1)
        self.u.copy_(u * sign)
        self.v.copy_(v * sign)

    def singular_values(self) -> torch.Tensor:
        """Singular values of the summed core, descending (differentiable): ``[r]``, or
        ``[H, r]`` per head."""
        return torch.linalg.svdvals(self.cores.float().sum(-3))

    def aux_loss(self, alpha: float, tau: float) -> torch.Tensor:
        """``alpha * mean_{i>=2} relu(sigma_i - tau)^2`` (math.md §3.7); per head, the mean is
        also over heads (as the authors' code)."""
        s = self.singular_values()
        return alpha * F.relu(s[..., 1:] - tau).pow(2).mean()


class MemoryRetrieval(nn.Module):
    """``x [T, D] -> (scores [T, H, m, h_c], addr [T, H, m])``, addr in ``[0, N^2)``."""

    def __init__(self, spec: RetrievalSpec, impl: str = "auto") -> None:
        super().__init__()
        self.spec, self.impl = spec, impl
        self.query_proj = nn.Linear(spec.d_model, spec.query_out, bias=False)
        # BatchNorm over the whole projection (Lample et al.); the others over each K-dim query
        self.query_norm = make_norm(spec.query_norm, spec.query_out if spec.query_norm == "batchnorm" else spec.key_dim)
        self.key_norm = make_norm(spec.key_norm, spec.key_dim)
        # [row/col, H, N, r, K]: per-head keys, each with r sub-keys (math.md §3.7); side-major, so
        # each side's keys are one contiguous [H * N * r, K] matrix for the score matmul
        self.keys = nn.Parameter(torch.empty(2, spec.heads, spec.n_keys, spec.sub_keys, spec.key_dim))
        per_head = spec.heads if spec.tucker_per_head else 0
        self.tucker = TuckerCores(spec.cores, spec.tucker_rank, per_head) if spec.tucker_rank else None
        self._key_cache: tuple[tuple, torch.Tensor] | None = None  # see normed_keys
        self.register_load_state_dict_pre_hook(_upgrade_hook)

    @torch.no_grad()
    def init_weights(self, std: float, head_major_keys: bool = False) -> None:
        """Query projection ``N(0, std^2)``, keys ``U(-1/sqrt(K), 1/sqrt(K))`` (Lample et al.),
        norms reset, Tucker cores drawn. ``head_major_keys``: draw the keys in ``[H, 2, N, r, K]``
        order, the layout PKM and Memory+ had before they shared this module, so a seed gives
        them the same weights (and every later draw) as before."""
        nn.init.normal_(self.query_proj.weight, std=std)
        bound = 1.0 / math.sqrt(self.spec.key_dim)  # Lample et al. key init
        if head_major_keys:
            drawn = torch.empty_like(self.keys.transpose(0, 1), memory_format=torch.contiguous_format)
            self.keys.copy_(nn.init.uniform_(drawn, -bound, bound).transpose(0, 1))
        else:
            nn.init.uniform_(self.keys, -bound, bound)
        for norm in (self.query_norm, self.key_norm):
            if hasattr(norm, "reset_parameters"):
                norm.reset_parameters()
        if isinstance(self.query_norm, nn.BatchNorm1d):
            self.query_norm.reset_running_stats()
        if self.tucker is not None:
            self.tucker.reset_parameters()

    def per_rank_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, D] -> (S_row, S_col)``, each ``[Q, T, G, N, r]`` (Q query groups of G heads
        that share a query; head ``h = q*G + g``; r = 1 without TDQKR).

        Query projection (:func:`skinny_linear`), then the :func:`key_scores` op: query norm
        and one matmul a side (a fused kernel at decode). Separate sides matter in training:
        as views of one ``[.., 2, N, r]`` tensor, each side's sparse gradient (only the selected
        keys' scores) was materialised at the size of both, ~2 ms a step at the 151M size (16 K
        tokens, H200). BatchNorm (over the whole projection) is applied here, before the op."""
        s, t = self.spec, x.shape[0]
        q = skinny_linear(x, self.query_proj.weight, impl=self.impl)  # F.linear but at decode
        norm, kind = self.query_norm, s.query_norm
        if kind == "batchnorm":  # over the whole projection, before the split
            q, norm, kind = norm(q), None, "none"
        q = q.view(t, s.n_queries, 2, s.query_ranks, s.key_dim)
        return key_scores(q, self.normed_keys(q.dtype), kind, getattr(norm, "weight", None),
                          getattr(norm, "bias", None), getattr(norm, "eps", None), impl=self.impl)

    def train(self, mode: bool = True) -> MemoryRetrieval:
        self._key_cache = None
        return super().train(mode)

    def normed_keys(self, dtype: torch.dtype) -> torch.Tensor:
        """``key_norm(keys)`` in ``dtype`` (math.md §3.5). In eval mode with no gradient recorded
        (decoding, evaluation) the result is cached until the keys or the norm's weights change
        (their version counters and storage are the cache key; ``train()`` / ``eval()`` also
        drop it, so even a write through ``.data`` is seen after a mode switch): normalising the whole key table costs a
        read and a write of it on every call, more than the scores themselves at decode batch
        sizes. The cache holds one extra copy of the key table."""
        if self.training or torch.is_grad_enabled():
            self._key_cache = None
            return self.key_norm(self.keys).to(dtype)
        stamp = (dtype, *((p._version, p.data_ptr()) for p in (self.keys, *self.key_norm.parameters())))
        if self._key_cache is None or self._key_cache[0] != stamp:
            self._key_cache = (stamp, self.key_norm(self.keys).to(dtype))
        return self._key_cache[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        s_row, s_col = self.per_rank_scores(x)  # [Q, T, G, N, r]
        if self.tucker is None:
            scores, addr = product_key_topk(s_row[..., 0], s_col[..., 0], s.k, s.topk, impl=self.impl)
            scores = scores.unsqueeze(-1)
        elif self.tucker.per_head:
            return self._per_head_topk(s_row, s_col)
        else:
            tk = self.tucker
            scores, addr = tucker_topk(s_row, s_col, tk.cores.to(s_row.dtype), tk.u.to(s_row.dtype),
                                       tk.v.to(s_row.dtype), s.k, s.topk, impl=self.impl)
        # [Q, T, G, m(, h_c)] -> [T, H, m(, h_c)] (small tensors)
        t = x.shape[0]
        return (scores.transpose(0, 1).reshape(t, s.heads, *scores.shape[3:]),
                addr.transpose(0, 1).reshape(t, s.heads, s.topk))

    def _per_head_topk(self, s_row: torch.Tensor, s_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tucker_per_head``: ``s_row, s_col [Q, T, G, N, r]`` -> ``(scores [T, H, m, h_c],
        addr [T, H, m])``. One :func:`tucker_topk` call per head with that head's cores and
        ``u, v`` (the op takes one core set for all its rows), so the kernels serve it
        unchanged; H is small (2 in the paper)."""
        s, tk, dt = self.spec, self.tucker, s_row.dtype
        g_size = s_row.shape[2]
        cores, u, v = tk.cores.to(dt), tk.u.to(dt), tk.v.to(dt)
        outs = []
        for h in range(s.heads):
            q, g = divmod(h, g_size)  # head h = q * G + g
            outs.append(tucker_topk(s_row[q, :, g], s_col[q, :, g], cores[h], u[h], v[h], s.k, s.topk,
                                    impl=self.impl))
        return torch.stack([o[0] for o in outs], 1), torch.stack([o[1] for o in outs], 1)

    def upgrade_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
        """Rewrite, in place, this module's entries of a state dict saved in an older layout: the
        product-key keys ``[H, 2, N, K]`` (PKM / Memory+ before they shared this module) become
        ``[2, H, N, 1, K]``. Runs before every ``load_state_dict`` (a pre-hook), and
        :func:`ultramem.checkpoint.load_model_weights` calls it before its shape check."""
        key = prefix + "keys"
        old = state_dict.get(key)
        s = self.spec
        if old is not None and s.sub_keys == 1 and tuple(old.shape) == (s.heads, 2, s.n_keys, s.key_dim):
            state_dict[key] = old.transpose(0, 1).unsqueeze(3).contiguous()

    def gains(self) -> list[torch.Tensor]:
        """The norm weights Appendix A calibrates (query first)."""
        out = []
        for norm in (self.query_norm, self.key_norm):
            w = getattr(norm, "weight", None)
            if w is not None:
                out.append(w)
        return out


def _upgrade_hook(module: MemoryRetrieval, state_dict: dict[str, torch.Tensor], prefix: str,
                  *args: object) -> None:
    module.upgrade_state_dict(state_dict, prefix)


@torch.no_grad()
def calibrate_gains(retrieval: MemoryRetrieval, samples: int, softmax: bool = False) -> tuple[float, float]:
    """Appendix A: scale the query/key norm gains so the mean selected score is 1.

    The paper estimates the mean of the top-m of n standard normals by sampling; the grid
    scores here are sums (or bilinear forms) of row and column scores, not independent, so we
    sample the retrieval itself: ``samples`` tokens ``x ~ N(0, I)`` (global RNG, so the init is
    deterministic per seed). Selection is invariant to a positive rescaling, so one pass fixes
    the scale exactly for the sample. Scores are ``∝ (g_q g_k)`` for sum scoring and
    ``∝ (g_q g_k)^2`` for Tucker scoring. Returns ``(mean, var / mean^2)`` of the selected
    per-core scores before rescaling (the second is ``sigma_s^2`` of math.md §4.5).
    """
    gains = retrieval.gains()
    if not gains:
        return 1.0, 0.0
    was_training = retrieval.training
    retrieval.eval()  # BatchNorm: use (fresh) running stats, do not update them
    x = torch.randn(samples, retrieval.spec.d_model, device=retrieval.keys.device, dtype=retrieval.keys.dtype)
    scores, _ = retrieval(x)
    retrieval.train(was_training)
    scores = scores.float()
    mu = scores.mean().item()
    rel_var = (scores.var() / scores.mean() ** 2).item() if scores.numel() > 1 else 0.0
    if softmax or mu <= 0:
        return mu, rel_var
    power = 2 if retrieval.tucker is not None else 1  # score ~ (g_q g_k)^power
    factor = mu ** (-1.0 / (power * len(gains)))
    for w in gains:
        w.mul_(factor)
    return mu, rel_var


# ---- product-key memories (PKM, Memory+) ----------------------------------------------------
def product_key_spec(cfg: ProductKeyMemoryConfig, d_model: int) -> RetrievalSpec:
    """The retrieval of a PKM / Memory+ config: plain product keys (math.md §2), i.e. TDQKR with
    the Tucker core, query sharing, key norm and query conv off."""
    return RetrievalSpec(
        d_model=d_model, heads=cfg.heads, share_query=False, key_dim=cfg.key_dim, n_keys=cfg.n_keys,
        tucker_rank=0, per_rank_query=False, cores=1, query_norm=cfg.query_norm, key_norm="none",
        topk=cfg.topk, k=cfg.k or cfg.topk, query_conv=0)


def check_product_keys(cfg: ProductKeyMemoryConfig, where: str) -> None:
    """Shared validation of product-key fields (n_keys, key_dim, heads, topk, k, query_norm)."""

    for name in ("n_keys", "key_dim", "heads", "topk"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{where}.{name}={getattr(cfg, name)} must be a positive integer")
    if getattr(cfg, "value_dim", 0) < 0:
        raise ConfigError(f"{where}.value_dim={cfg.value_dim}; allowed: 0 (= d_model) or a positive size")
    k = cfg.k or cfg.topk
    if k > cfg.n_keys:
        raise ConfigError(f"{where}.k={k} exceeds {where}.n_keys={cfg.n_keys}; allowed: k <= n_keys")
    if cfg.topk > k * k:
        raise ConfigError(
            f"{where}.topk={cfg.topk} exceeds k^2={k * k} candidates (k={k}); raise {where}.k "
            f"or lower {where}.topk"
        )
    if cfg.query_norm not in PK_QUERY_NORMS:
        raise ConfigError(f"{where}.query_norm={cfg.query_norm!r}; allowed: {', '.join(PK_QUERY_NORMS)}")


class ProductKeyMemoryConfig(MemoryLayerConfig):
    """Methods shared by the PKM and Memory+ configs (fields: n_keys, key_dim, heads, topk, k,
    query_norm, value_dim)."""

    def validate(self, shape: ShapeContext, where: str) -> None:
        check_product_keys(self, where)

    def _dv(self, shape: ShapeContext) -> int:
        return self.value_dim or shape.d_model
