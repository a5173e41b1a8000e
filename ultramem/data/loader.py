"""Batches from prepared token shards, in a seeded order with an exact, stateless position.

The split's tokens are viewed as consecutive windows of ``seq_len + 1`` tokens (stride
``seq_len``). Epoch ``e`` visits the windows in ``permutation(seed, e)``; global sample ``g``
is window ``perm(g // n)[g % n]``. Batch ``k`` of rank ``r`` (of ``W``) holds samples
``(k W + r) B ... (k W + r) B + B - 1``, so the data position is just ``k`` (the number of
batches consumed): resume and multi-process runs need no sampler state.

Given ``vocab_size``, every batch is checked for token ids the model cannot embed (a damaged
shard or a dataset prepared with a larger tokenizer): a DataError names the shard.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ultramem.data.index import load_index, shard_path
from ultramem.data.prepare import open_tokens
from ultramem.errors import DataError


def split_tokens(path: str | Path, split: str) -> list[np.ndarray]:
    """Memmaps of the split's shards (in index order)."""
    return _split_shards(Path(path), split)[0]


def _split_shards(path: Path, split: str) -> tuple[list[np.ndarray], list[Path]]:
    index = load_index(path)
    if split not in index["splits"]:
        raise DataError(f"{path}: no split {split!r} (have {list(index['splits'])})")
    arrays, files = [], []
    for shard in index["splits"][split]["shards"]:
        files.append(shard_path(path, index, shard))
        if index["kind"] == "npy":
            arr = open_tokens(Path(shard["file"]), shard["npy_dtype"])
            arrays.append(arr[shard["offset"]: shard["offset"] + shard["tokens"]])
        else:
            f = files[-1]
            if not f.is_file():
                raise DataError(f"{f}: shard missing from the prepared dataset")
            arr = np.memmap(f, dtype=np.dtype(index["dtype"]), mode="r")
            if arr.size != shard["tokens"]:
                raise DataError(f"{f}: {arr.size} tokens, the index says {shard['tokens']} (truncated?)")
            arrays.append(arr)
    return arrays, files


class TokenBatches:
    """``batch(k) -> (x, y)``, both ``[B, S]`` int64; ``y`` is ``x`` shifted by one."""

    def __init__(self, path: str | Path, split: str, seq_len: int, batch_size: int,
                 seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True,
                 vocab_size: int | None = None) -> None:
        self.arrays, self.files = _split_shards(Path(path), split)
        self.vocab_size = vocab_size
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
            if self.vocab_size is not None and rows[-1].max() >= self.vocab_size:
                bad = int(rows[-1].max())
                raise DataError(f"{self.files[shard]}: token id {bad} near token {start} is outside the "
                                f"model's vocabulary (model.vocab_size={self.vocab_size}); the shard is "
                                f"damaged or was made by a larger tokenizer -- prepare the dataset again")
        data = torch.from_numpy(np.stack(rows))
        return data[:, :-1], data[:, 1:]
