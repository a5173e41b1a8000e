"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) and its training.

The committed ``ultramem/assets/tokenizer.json`` was trained on the default corpus with::

    ultramem data tokenizer --vocab-size 8192 --out ultramem/assets/tokenizer.json

Id 0 is ``<|endoftext|>``, appended after every document. Byte-level: any text encodes
(no unknown token), and decoding is exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ultramem.data.corpus import EOT
from ultramem.errors import DataError

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

DEFAULT_VOCAB = 8192


def _tokenizers() -> ModuleType:
    """The ``tokenizers`` package, imported on first use (not a core dependency of ultramem)."""
    try:
        import tokenizers  # noqa: PLC0415
    except ImportError:
        raise DataError("tokenizing needs the 'tokenizers' package: pip install 'ultramem[train]'") from None
    return tokenizers


def default_tokenizer_path() -> Path:
    return Path(str(resources.files("ultramem") / "assets" / "tokenizer.json"))


class Tokenizer:
    """Thin wrapper: ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``eot_id``."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_tokenizer_path()
        if not self.path.is_file():
            raise DataError(f"{self.path}: tokenizer file not found")
        self.hf = _tokenizers().Tokenizer.from_file(str(self.path))
        eot = self.hf.token_to_id(EOT)
        if eot is None:
            raise DataError(f"{self.path}: tokenizer has no {EOT!r} token")
        self.eot_id = eot

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB) -> HFTokenizer:
    """Byte-level BPE: GPT-2 pre-tokenisation (regex split, byte alphabet), ``<|endoftext|>``
    as id 0, all 256 bytes in the initial alphabet."""
    tk = _tokenizers()
    decoders, pre_tokenizers, trainers = tk.decoders, tk.pre_tokenizers, tk.trainers
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
