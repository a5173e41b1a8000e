"""Bytes each rank sends for one sharded lookup, per collective (docs/distributed.md §3), and
the partition they pick.

Symbols (per rank of an ``mp`` group of size ``M``): ``T`` tokens, ``n`` selections per token
(heads x top-m), ``h_c`` cores, ``E`` output blocks (IVE, §3.6; 1 for V2), ``D_v`` value dim,
``D_p`` pre-value dim (0: none), ``b`` bytes of a table element (scores, pre-queries and
outputs travel in the table's dtype), 8-byte indices, fp32 pre-value dots.

Row-wise moves each selection once, to its owner, but returns a full partial sum from every
owner; column-wise sends every selection to every rank but returns only a ``1/M`` slice. So
row-wise wins when selections are heavy next to outputs (``n (16 + b h_c)`` against
``M E D_v b``), column-wise when the value rows are wide.
"""

from __future__ import annotations

from dataclasses import dataclass

Volumes = dict[tuple[str, str], float]  # (collective, "forward" | "backward") -> bytes sent


@dataclass(frozen=True)
class LookupShape:
    """One lookup call as a rank sees it (the call's arguments, not the config)."""

    tokens: int  # T
    selections: int  # n
    cores: int  # h_c
    blocks: int  # E
    value_dim: int  # D_v (full, unsharded)
    pre_value_dim: int = 0  # D_p (full), 0: no pre-values
    value_bytes: int = 4  # b

    def expected_offrank(self, m: int) -> float:
        """Selections a rank sends to other owners when rows are hit uniformly: ``T n (M-1)/M``."""
        return self.tokens * self.selections * (m - 1) / m


def rowwise_bytes(s: LookupShape, m: int, sent: float | None = None, received: float | None = None,
                  grad: bool = True) -> Volumes:
    """Row-wise volumes. ``sent`` / ``received``: selections this rank sends to / receives from
    other ranks (data-dependent; default :meth:`LookupShape.expected_offrank`)."""
    sent = s.expected_offrank(m) if sent is None else sent
    received = s.expected_offrank(m) if received is None else received
    b, t = s.value_bytes, s.tokens
    ints = 2 + (s.blocks > 1)  # token, local row[, block]
    v: Volumes = {
        ("row.counts", "forward"): (m - 1) * 2 * 8,
        ("row.index", "forward"): sent * ints * 8,
        ("row.scores", "forward"): sent * s.cores * b,
        ("row.partial", "forward"): (m - 1) * t * s.blocks * s.value_dim * b,
    }
    if s.pre_value_dim:
        v[("row.pre_query", "forward")] = (m - 1) * t * s.pre_value_dim * b
    if grad:
        v[("row.scores", "backward")] = received * s.cores * b
        v[("row.partial", "backward")] = v[("row.partial", "forward")]
        if s.pre_value_dim:  # reduce-scatter of the gathered pre-queries' gradient
            v[("row.pre_query", "backward")] = v[("row.pre_query", "forward")]
    return v


def columnwise_bytes(s: LookupShape, m: int, grad: bool = True) -> Volumes:
    """Column-wise volumes (data-independent)."""
    b, tn = s.value_bytes, s.tokens * s.selections
    v: Volumes = {
        ("col.index", "forward"): (m - 1) * tn * (1 + (s.blocks > 1)) * 8,
        ("col.scores", "forward"): (m - 1) * tn * s.cores * b,
        ("col.out", "forward"): (m - 1) * s.tokens * s.blocks * (s.value_dim // m) * b,
    }
    if s.pre_value_dim:
        v[("col.pre_query", "forward")] = (m - 1) * s.tokens * (s.pre_value_dim // m) * b
        v[("col.dots", "forward")] = 2 * (m - 1) * tn * 4  # all-reduce of [M T, n] fp32 dots
    if grad:
        for name in ("col.scores", "col.out", "col.pre_query", "col.dots"):
            if (name, "forward") in v:
                v[(name, "backward")] = v[(name, "forward")]
    return v


def total(v: Volumes) -> float:
    return sum(v.values())


def choose_partition(shapes: list[LookupShape], m: int) -> str:
    """``"row"`` or ``"col"``: the fewer expected bytes (forward + backward) summed over every
    lookup that reads the table (a shared V2 pool is read by every layer)."""
    row = sum(total(rowwise_bytes(s, m)) for s in shapes)
    col = sum(total(columnwise_bytes(s, m)) for s in shapes)
    return "row" if row < col else "col"
