"""Inference: loading a trained run (:mod:`.load`) and sampling with the KV cache (:mod:`.generate`)."""
