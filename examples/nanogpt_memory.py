"""A nanoGPT-style model with an UltraMemV2 layer beside every block's MLP, trained on bytes.

    python examples/nanogpt_memory.py            # 30 CPU steps on the bundled text slice
"""

import torch
import torch.nn.functional as F
from byte_training import train  # the loop shared by the examples (examples/byte_training.py)
from torch import nn

from ultramem.nn import UltraMemV2


class Block(nn.Module):
    def __init__(self, d: int, heads: int, memory: nn.Module) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.memory = memory  # reads the MLP's normalised input, adds beside the MLP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = self.ln2(x)
        return x + self.mlp(h) + self.memory(h)


class GPT(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 64, n_layers: int = 2, heads: int = 4, ctx: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        memories = UltraMemV2.stack(n_layers, d, n_values=16**2, topk=8, host_layers=n_layers)  # one shared pool
        self.blocks = nn.ModuleList(Block(d, heads, m) for m in memories)
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def main(steps: int = 30, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    model = GPT()
    return train(model, lambda x, y: F.cross_entropy(model(x).flatten(0, 1), y.flatten()), steps)


if __name__ == "__main__":
    losses = main()
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
