"""Drop-in ultramem layers for your own model (nanoGPT, Hugging Face, torchtitan, ...).

    from ultramem.nn import UltraMemV2, param_groups, aux_loss

See :mod:`ultramem.nn.layers` (the layers) and :mod:`ultramem.nn.optim` (optimiser groups with
the value-LR rule, aux losses, the per-step hook); docs/ecosystem.md has full examples.
"""

from ultramem.nn.layers import PKM, MemoryPlus, UltraMem, UltraMemV2
from ultramem.nn.optim import after_optimizer_step, aux_loss, param_groups, set_lr

__all__ = ["PKM", "MemoryPlus", "UltraMem", "UltraMemV2", "after_optimizer_step", "aux_loss", "param_groups",
           "set_lr"]
