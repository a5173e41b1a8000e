"""Lookup-reduce over a value table sharded across the ``mp`` ranks (docs/distributed.md §2).

Both partitions compute exactly :func:`ultramem.ops.lookup_reduce.lookup_reduce` on the full
table (``docs/math.md §2``) for the tokens of every rank of the group; each rank brings its own
``T`` tokens (the same ``T`` on every rank) and gets its own ``[T, E, D_v]`` back.

Row-wise (``values [P, D_v]`` -> rank k holds rows ``[k R, (k + 1) R)``, ``R = P / M``)::

    each selection (token, row, block, scores) --all-to-all--> the row's owner
    pre-queries [T, D_p]                       --all-gather--> every owner
    owner: partial[t, g] = sum of its selections (the op on its R rows, fused kernel on GPU)
    partials [M, T, E, D_v]                    --all-to-all--> back to the token's rank, summed

Column-wise (rank k holds columns ``[k D_v / M, (k + 1) D_v / M)`` of every row, and the same
slice of the pre-values)::

    idx, block, scores [T, n, .]  --all-gather--> every rank (M T tokens)
    pre-query slices              --all-to-all--> rank k gets column slice k of every token
    pre-value dots (V2)           partial over the D_p slice, --all-reduce-->, then phi
    each rank pools its D_v / M columns for all M T tokens; slices --all-to-all--> back

Multi-core scoring (§3.8) splits a value row into ``h_c`` slices; a column shard must hold whole
slices or lie inside one (``M % h_c == 0`` or ``h_c % M == 0``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ultramem.distributed import comm
from ultramem.errors import ConfigError
from ultramem.ops.lookup_reduce import lookup_reduce
from ultramem.ops.lookup_reduce.reference import ACTIVATIONS

PARTITIONS = ("row", "col")


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor parameter's local shard (differentiable), a plain tensor as is."""
    return t.to_local() if t is not None and hasattr(t, "to_local") else t


class ShardedLookup:
    """A drop-in for ``lookup_reduce`` (same arguments) on tables sharded over ``group``.

    ``values`` / ``pre_values`` are the sharded parameters (DTensors, or local shards). On a
    one-rank group the table is whole and the op is plain ``lookup_reduce``, unless
    ``always_communicate`` (the GPU overlap test and benchmark run the collectives on one device)."""

    def __init__(self, partition: str, group: dist.ProcessGroup, always_communicate: bool = False) -> None:
        if partition not in PARTITIONS:
            raise ConfigError(f"partition={partition!r}; allowed: {', '.join(PARTITIONS)}")
        self.partition, self.group, self.always_communicate = partition, group, always_communicate

    def __repr__(self) -> str:
        return f"ShardedLookup({self.partition!r}, mp={dist.get_world_size(self.group)})"

    def __call__(self, values, idx, scores, block=None, num_blocks=1, pre_values=None, pre_query=None,
                 activation="identity", impl="auto") -> torch.Tensor:
        if scores.dim() == 2:
            scores = scores.unsqueeze(-1)
        if block is None or num_blocks == 1:
            block, num_blocks = None, 1
        if dist.get_world_size(self.group) == 1 and not self.always_communicate:  # tables whole here (mp = 1)
            return lookup_reduce(_local(values), idx, scores, block, num_blocks, _local(pre_values),
                                 pre_query, activation, impl)
        fn = rowwise_lookup if self.partition == "row" else columnwise_lookup
        return fn(_local(values), idx, scores, block, num_blocks, _local(pre_values), pre_query,
                  activation, impl, self.group)


def rowwise_lookup(v: torch.Tensor, idx: torch.Tensor, scores: torch.Tensor, block: torch.Tensor | None,
                   e: int, u: torch.Tensor | None, pre_query: torch.Tensor | None, activation: str,
                   impl: str, group: dist.ProcessGroup) -> torch.Tensor:
    """``v [R, D_v]`` (this rank's rows), ``idx [T, n]`` global rows, ``scores [T, n, h_c]``,
    ``u [R, D_p]``, ``pre_query [T, D_p]`` -> ``[T, E, D_v]``."""
    m = dist.get_world_size(group)
    t, n = idx.shape
    r_rows, d_v, h_c = v.shape[0], v.shape[1], scores.shape[-1]
    owner = (idx // r_rows).reshape(-1)
    order = torch.argsort(owner, stable=True)
    send = torch.bincount(owner, minlength=m)
    told = torch.stack([send, torch.full_like(send, t)], 1)  # [M, 2]: selections for r, my T
    heard = comm.exchange_counts(told, group, "row.counts")
    if bool((heard[:, 1] != t).any()):
        raise ValueError(f"row-wise lookup: token counts differ across the mp group ({heard[:, 1].tolist()})")
    send_l, recv_l = send.tolist(), heard[:, 0].tolist()
    tok = torch.arange(t, device=idx.device).repeat_interleave(n)[order]
    meta = [tok, (idx.reshape(-1) % r_rows)[order]] + ([block.reshape(-1)[order]] if block is not None else [])
    got = comm.all_to_all(torch.stack(meta, 1), recv_l, send_l, group, "row.index")  # [S, 2|3]
    sc = comm.all_to_all(scores.reshape(t * n, h_c)[order], recv_l, send_l, group, "row.scores")
    src = torch.repeat_interleave(torch.arange(m, device=idx.device), torch.tensor(recv_l, device=idx.device))
    slot = src * t + got[:, 0]  # position of the requesting token among the group's M T tokens
    pq = None
    if u is not None:
        pq = comm.all_gather(pre_query, group, "row.pre_query")[slot]  # [S, D_p]
    part = lookup_reduce(v, got[:, 1:2], sc.unsqueeze(1), pre_values=u, pre_query=pq,
                         activation=activation, impl=impl)[:, 0]  # [S, D_v], one selection a row
    dest = slot * e + (got[:, 2] if block is not None else 0)
    partial = part.new_zeros(m * t * e, d_v).index_add(0, dest, part)  # [M T E, D_v]
    back = comm.all_to_all(partial, [t * e] * m, [t * e] * m, group, "row.partial")
    return back.view(m, t, e, d_v).sum(0)


def _core_slice(h_c: int, m: int, k: int) -> slice:
    """The cores (score columns) that weight column shard ``k`` of ``m`` (§3.8)."""
    if h_c % m == 0:
        return slice(k * h_c // m, (k + 1) * h_c // m)
    if m % h_c == 0:
        c = k // (m // h_c)
        return slice(c, c + 1)
    raise ConfigError(f"column-wise sharding over mp={m} needs mp % cores == 0 or cores % mp == 0 "
                      f"(cores={h_c}); use partition='row' or another mp size")


def columnwise_lookup(v: torch.Tensor, idx: torch.Tensor, scores: torch.Tensor, block: torch.Tensor | None,
                      e: int, u: torch.Tensor | None, pre_query: torch.Tensor | None, activation: str,
                      impl: str, group: dist.ProcessGroup) -> torch.Tensor:
    """``v [P, D_v / M]`` (this rank's columns), ``u [P, D_p / M]``; other shapes as
    :func:`rowwise_lookup`; returns ``[T, E, D_v]``."""
    m, me = dist.get_world_size(group), dist.get_rank(group)
    t, n = idx.shape
    d_loc = v.shape[1]
    ints = torch.stack([idx, block], -1) if block is not None else idx.unsqueeze(-1)
    ints = comm.all_gather(ints, group, "col.index")  # [M T, n, 1|2]
    idx_all = ints[..., 0]
    blk_all = ints[..., 1] if block is not None else None
    sc = comm.all_gather(scores, group, "col.scores")[..., _core_slice(scores.shape[-1], m, me)]
    if u is not None:
        p_loc = u.shape[1]
        pq = pre_query.view(t, m, p_loc).transpose(0, 1).reshape(m * t, p_loc)  # slice r for rank r
        pq = comm.all_to_all(pq, [t] * m, [t] * m, group, "col.pre_query")  # [M T, D_p / M]
        dots = torch.einsum("tnp,tp->tn", u[idx_all].float(), pq.float())
        dots = comm.all_reduce(dots, group, "col.dots")  # full <pre_query, U[row]>
        sc = sc * ACTIVATIONS[activation](dots).unsqueeze(-1).to(sc.dtype)
    pooled = lookup_reduce(v, idx_all, sc, blk_all, e, impl=impl)  # [M T, E, D_v / M]
    back = comm.all_to_all(pooled.reshape(m * t, e * d_loc), [t] * m, [t] * m, group, "col.out")
    return back.view(m, t, e, d_loc).permute(1, 2, 0, 3).reshape(t, e, m * d_loc)
