"""Evaluation: validation loss and bits per byte (:mod:`ultramem.eval.loss`), ``ultramem eval``."""
