"""The one norm factory: the host model's block norms and the memory layers' query/key norms."""

from __future__ import annotations

from torch import nn

NORMS = ("none", "batchnorm", "layernorm", "rmsnorm")


def make_norm(kind: str, dim: int, eps: float | None = None) -> nn.Module:
    """A norm over the last ``dim`` features (``batchnorm``: over the features of ``[T, dim]``).

    ``eps=None`` keeps each module's default (LayerNorm and BatchNorm 1e-5, RMSNorm the dtype's
    machine epsilon), which is what the memory layers use; the host model passes ``model.norm_eps``."""
    if kind == "layernorm":
        return nn.LayerNorm(dim) if eps is None else nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "batchnorm":  # Lample et al.: BatchNorm on the PKM query
        return nn.BatchNorm1d(dim) if eps is None else nn.BatchNorm1d(dim, eps=eps)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm {kind!r}; allowed: {', '.join(NORMS)}")
