"""Batches from prepared token shards, in a seeded order with an exact, stateless position.

The split's tokens are viewed as consecutive windows of ``seq_len + 1`` tokens (stride
``seq_len``). Epoch ``e`` visits the windows in ``permutation(seed, e)``; global sample ``g``
is window ``perm(g // n)[g % n]``. Batch ``k`` of rank ``r`` (of ``W``) holds samples
``(k W + r) B ... (k W + r) B + B - 1``, so the data position is just ``k`` (the number of
batches consumed): resume and multi-process runs need no sampler state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ultramem.data.prepare import load_index, open_tokens
from ultramem.errors import DataError


def split_tokens(path: str | Path, split: str) -> list[np.ndarray]:
    """Memmaps of the split's shards (in index order)."""
    path = Path(path)
    index = load_index(path)
    if split not in index["splits"]:
        raise DataError(f"{path}: no split {split!r} (have {list(index['splits'])})")
    arrays = []
    for shard in index["splits"][split]["shards"]:
        if index["kind"] == "npy":
            arr = open_tokens(Path(shard["file"]), shard["npy_dtype"])
            arrays.append(arr[shard["offset"]: shard["offset"] + shard["tokens"]])
        else:
            f = path / shard["file"]
            if not f.is_file():
                raise DataError(f"{f}: shard missing from the prepared dataset")
            arr = np.memmap(f, dtype=np.dtype(index["dtype"]), mode="r")
            if arr.size != shard["tokens"]:
                raise DataError(f"{f}: {arr.size} tokens, the index says {shard['tokens']} (truncated?)")
            arrays.append(arr)
    return arrays


class TokenBatches:
    """``batch(k) -> (x, y)``, both ``[B, S]`` int64; ``y`` is ``x`` shifted by one."""

    def __init__(self, path: str | Path, split: str, seq_len: int, batch_size: int,
                 seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.arrays = split_tokens(path, split)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        # window (shard, start) table: windows never straddle shards
        starts = [(i, s) for i, a in enumerate(self.arrays) for s in range(0, a.size - seq_len - 1 + 1, seq_len)]
        if not starts:
            total = sum(a.size for a in self.arrays)
            raise DataError(f"{path}: split {split!r} has {total} tokens, fewer than seq_len+1={seq_len + 1}")
        self.windows = np.array(starts, dtype=np.int64)
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def __len__(self) -> int:
        """Windows in the split."""
        return len(self.windows)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.windows))
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.windows)
        first = (k * self.world + self.rank) * self.batch_size
        rows = []
        for g in range(first, first + self.batch_size):
            shard, start = self.windows[self._order(g // n)[g % n]]
            rows.append(np.asarray(self.arrays[shard][start: start + self.seq_len + 1], dtype=np.int64))
        data = torch.from_numpy(np.stack(rows))
        return data[:, :-1], data[:, 1:]
