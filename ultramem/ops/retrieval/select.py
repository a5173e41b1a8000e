"""Exact top-k inside one Triton program: an integer radix select over uint32 keys.

Scores become order-preserving uint32 keys (:func:`ukey32`, 0 = invalid), so every selection
of the retrieval kernels (phase 1 over N keys, the grid's local top-m, the final top-m) is the
same :func:`select_rows`: find the largest threshold with at least ``need`` keys at or above it,
then take the keys above it and, by position, enough of the keys equal to it. Ties therefore go
to the lower position, which is what makes the kernels select exactly the reference's set.
Design and measurements: ``docs/kernels.md`` (Retrieval).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ukey32(x):
    """fp32 -> uint32 with the same order (0 only for a NaN pattern: used as 'invalid')."""
    b = x.to(tl.uint32, bitcast=True)
    flip = tl.where((b >> 31) == 1, tl.full(b.shape, 0xFFFFFFFF, tl.uint32),
                    tl.full(b.shape, 0x80000000, tl.uint32))
    return b ^ flip


@triton.jit
def _common_prefix(lb, hi):
    """``(thr, step)``: the bits of ``hi`` above the highest bit where ``lb`` and ``hi`` differ,
    and that bit (0 when they are equal: then ``thr = hi``). Branch-free (a bit smear)."""
    d = lb ^ hi
    d = d | (d >> 1)
    d = d | (d >> 2)
    d = d | (d >> 4)
    d = d | (d >> 8)
    d = d | (d >> 16)  # all ones from the highest differing bit down
    return hi & ~d, tl.where(d == 0, tl.zeros_like(d), (d >> 1) + 1)


@triton.jit
def _count(ka, kb, thr, TWO: tl.constexpr, GT: tl.constexpr):
    """Keys ``>= thr`` (``> thr`` with ``GT``) in the pieces ``ka [1, J, W]`` and, with ``TWO``,
    ``kb [1, J', W]`` (summed over J inside each thread first: the pieces share W and its
    layout, so one block reduction counts both)."""
    if GT:
        x = (ka > thr).to(tl.int32)
    else:
        x = (ka >= thr).to(tl.int32)
    if TWO:
        if GT:
            xb = (kb > thr).to(tl.int32)
        else:
            xb = (kb >= thr).to(tl.int32)
        n = tl.sum(tl.sum(x, axis=1) + tl.sum(xb, axis=1))
    else:
        n = tl.sum(x)
    return n


@triton.jit
def _rank(x):
    """Inclusive prefix sum of ``x [1, J, W]`` (int32) in position order ``j * W + w``: a scan
    along W plus the exclusive prefix of the J partial sums."""
    if x.shape[1] == 1:
        r = tl.cumsum(x, axis=2)
    else:
        tot = tl.sum(x, axis=2)
        r = tl.cumsum(x, axis=2) + (tl.cumsum(tot, axis=1) - tot)[:, :, None]
    return r


@triton.jit
def _take(key, thr, room):
    """Keys ``> thr``, and keys ``== thr`` while their position-order rank is ``<= room``; also
    the number of keys ``== thr`` (``[1, 1, 1]``)."""
    eq = (key == thr).to(tl.int32)
    take = (key > thr) | ((eq != 0) & (_rank(eq) <= room))
    return take, tl.sum(tl.sum(eq, axis=2), axis=1)[:, None, None]


@triton.jit
def select_rows(ka, kb, need, KCH: tl.constexpr, TWO: tl.constexpr):
    """Mask and output slot of the ``need`` largest uint32 keys (0 = invalid) of one row, ties
    to the lower position. The row is a piece ``ka [1, JA, W]`` and, with ``TWO``, a second
    piece ``kb [1, JB, W]`` after it (position ``j * W + w`` within a piece; any powers of two,
    so N need not be padded to one power of two, e.g. N 2200 as ``[1, 8, 256]`` + ``[1, 1,
    256]``); without ``TWO``, ``kb`` is ignored. Counts add over the pieces, tie ranks and
    output slots continue from ``ka`` into ``kb``. Returns ``take_a, pos_a, take_b, pos_b``
    (``take_b, pos_b`` = ``take_a, pos_a`` without TWO).

    Radix select from the top bit: ``thr`` grows one bit a pass (a count of ``key >= thr |
    bit``, one block reduction) to the largest value with at least ``need`` keys at or above
    it. A row's latency is this serial chain of passes, so it is shortened twice:

    - a lower bound: the maxima of ``KCH >= need`` disjoint groups of keys (the keys whose W
      index is ``g mod KCH``, over both pieces; ``W >= KCH``) are ``KCH`` distinct keys, so at
      least ``need`` keys are >= their minimum ``lb``; the bits above the highest bit where
      ``lb`` and the maximum differ are known at once (for real scores: sign and exponent);
    - an early exit once a pass counts exactly ``need`` keys at or above the candidate.
    """
    col = tl.max(ka, axis=1)  # [1, W]
    if TWO:
        col = tl.maximum(col, tl.max(kb, axis=1))
    lbs = tl.max(tl.reshape(col, [1, col.shape[1] // KCH, KCH]), axis=1)  # [1, KCH]
    thr, step = _common_prefix(tl.min(lbs), tl.max(col))
    go = step != 0
    # the count is inlined (not _count): the interpreter pays about 1 ms a nested jit call
    while go:
        t = thr | step
        x = (ka >= t).to(tl.int32)
        if TWO:
            xb = (kb >= t).to(tl.int32)
            cnt = tl.sum(tl.sum(x, axis=1) + tl.sum(xb, axis=1))
        else:
            cnt = tl.sum(x)
        thr = tl.where(cnt >= need, t, thr)
        step = tl.where(cnt == need, 0, step >> 1)  # early exit: exactly `need` at or above
        go = step != 0
    thr = thr + tl.zeros([1, 1, 1], dtype=tl.uint32)
    n_ge = _count(ka, kb, thr, TWO, False)
    if n_ge != need:  # ties at thr (never after an early exit)
        room = need - _count(ka, kb, thr, TWO, True)  # keys == thr fill the slots left
        take_a, n_eq = _take(ka, thr, room)
        room_b = room - n_eq  # tie slots left for the second piece
    else:
        take_a = ka >= thr
        room_b = tl.zeros([1, 1, 1], dtype=tl.int32)
    pos_a = _rank(take_a.to(tl.int32)) - 1
    if TWO:
        if n_ge != need:
            take_b, _n = _take(kb, thr, room_b)
        else:
            take_b = kb >= thr
        n_a = tl.sum(tl.sum(take_a.to(tl.int32), axis=2), axis=1)[:, None, None]
        pos_b = n_a + _rank(take_b.to(tl.int32)) - 1
    else:
        take_b = take_a
        pos_b = pos_a
    return take_a, pos_a, take_b, pos_b


@triton.jit
def select(key, need, KCH: tl.constexpr):
    """:func:`select_rows` for one 1-D block of keys: ``(take, pos)`` shaped like ``key``."""
    k3 = key[None, None, :]
    take, pos, _tb, _pb = select_rows(k3, k3, need, KCH, False)
    return tl.reshape(take, key.shape), tl.reshape(pos, key.shape)
