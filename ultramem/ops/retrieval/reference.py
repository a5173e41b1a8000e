"""Product-key retrieval in plain PyTorch: the specification the kernels are tested against.

Shapes: ``...`` is any leading batch shape (tokens x heads in the layers).

- :func:`product_key_topk` -- math.md §2: phase-1 top-k per side, k x k grid of sums, top-m.
- :func:`tucker_topk` -- math.md §3.7/3.8: phase 1 with the rank-1 approximation ``u, v`` of the
  (summed) Tucker core, exact bilinear rescoring of the k x k candidates with every core,
  selection by the sum over cores, per-core scores returned for multi-core scoring.
- :func:`brute_force_topk` -- the exact top-m over all N^2 addresses (tests only).
"""

from __future__ import annotations

import torch


def product_key_topk(
    s_row: torch.Tensor, s_col: torch.Tensor, k: int, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s_row, s_col: [..., N]`` -> ``(scores [..., m], addr [..., m])`` with ``addr = a*N + b``.

    Exact (equal to the brute-force top-m of ``s_row[a] + s_col[b]``) whenever ``k >= m``.
    """
    n = s_row.shape[-1]
    top_r, i_r = s_row.topk(k, dim=-1)  # [..., k]
    top_c, i_c = s_col.topk(k, dim=-1)
    grid = top_r.unsqueeze(-1) + top_c.unsqueeze(-2)  # [..., k, k]
    scores, flat = grid.flatten(-2).topk(m, dim=-1)  # [..., m]
    a = i_r.gather(-1, torch.div(flat, k, rounding_mode="floor"))
    b = i_c.gather(-1, flat % k)
    return scores, a * n + b


def tucker_topk(
    s_row: torch.Tensor,
    s_col: torch.Tensor,
    cores: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    k: int,
    m: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-phase TDQKR selection.

    Args:
        s_row, s_col: ``[..., N, r]`` per-rank scores ``S[n, t] = <q, K[n, :, t]>``.
        cores: ``[h_c, r, r]`` Tucker cores (h_c = 1 without multi-core scoring).
        u, v: ``[r]`` leading singular vectors of ``cores.sum(0)`` (no gradient).
        k: phase-1 candidates per side; m: values selected.

    Returns:
        ``scores [..., m, h_c]`` exact per-core scores ``S_row[a]^T C_c S_col[b]`` (gradient
        flows to s_row, s_col and cores) and ``addr [..., m]`` = ``a*N + b``, ordered by the
        summed score, descending.
    """
    n, r = s_row.shape[-2:]
    _, i_r = (s_row @ u).topk(k, dim=-1)  # [..., k] phase 1 (rank-1 approximation)
    _, i_c = (s_col @ v).topk(k, dim=-1)
    rows = s_row.gather(-2, i_r.unsqueeze(-1).expand(*i_r.shape, r))  # [..., k, r]
    cols = s_col.gather(-2, i_c.unsqueeze(-1).expand(*i_c.shape, r))  # [..., k, r]
    per_core = torch.einsum("...ar,crs,...bs->...abc", rows, cores, cols)  # [..., k, k, h_c]
    h_c = cores.shape[0]
    flat_scores = per_core.flatten(-3, -2)  # [..., k*k, h_c]
    _, flat = flat_scores.sum(-1).topk(m, dim=-1)  # [..., m] selection by the summed score
    scores = flat_scores.gather(-2, flat.unsqueeze(-1).expand(*flat.shape, h_c))
    a = i_r.gather(-1, torch.div(flat, k, rounding_mode="floor"))
    b = i_c.gather(-1, flat % k)
    return scores, a * n + b


def brute_force_topk(full_scores: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``full_scores [..., N, N]`` -> exact top-m ``(scores, addr)`` over all N^2 addresses."""
    return full_scores.flatten(-2).topk(m, dim=-1)


def ive_address(addr: torch.Tensor, perm: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """math.md §3.6 implicit value expansion: logical ``addr`` in ``[0, N^2)`` -> ``(row, block)``
    with ``pi = perm[addr]``, ``row = pi mod P``, ``block = pi div P`` (int64 both)."""
    pi = perm[addr].long()
    return pi % num_rows, torch.div(pi, num_rows, rounding_mode="floor")


def ring_address(addr: torch.Tensor, perm: torch.Tensor | None, window: int, offset: torch.Tensor,
                 pool_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UltraMemV2's ring map (math.md §4.4): logical ``addr`` -> ``(local, row)`` with ``a =
    perm[addr]`` (when a permutation is given), ``local = a mod P'`` (``window``) and ``row =
    (local + offset) mod P_all`` (``pool_rows``; ``offset`` a one-element tensor, the window's
    first pool row, negative for layer 0 of the centred ring), int64 both."""
    if perm is not None:
        addr = perm[addr].long()
    local = addr % window
    return local, (local + offset) % pool_rows
