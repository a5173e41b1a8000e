"""Data: documents -> tokenizer -> token shards -> batches.

- :mod:`ultramem.data.corpus`: the bundled default corpus, local files, source trees;
- :mod:`ultramem.data.tokenizer`: the byte-level BPE (``ultramem/assets/tokenizer.json``);
- :mod:`ultramem.data.prepare`: shards + ``index.json`` with a hash-based split;
- :mod:`ultramem.data.loader`: seeded, stateless batches for training and evaluation.
"""
