"""An UltraMem layer beside the MLP of a Hugging Face Llama (built from a config: random weights,
offline), trained a few steps on bytes.

    python examples/hf_llama_memory.py           # needs transformers (pip install "ultramem[hf]")
"""

from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ultramem.nn import UltraMem, after_optimizer_step, aux_loss, param_groups, set_lr


class MLPWithMemory(nn.Module):
    """Llama calls ``mlp(post_attention_layernorm(x))``: the memory reads the same input."""

    def __init__(self, mlp: nn.Module, memory: nn.Module) -> None:
        super().__init__()
        self.mlp, self.memory = mlp, memory

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h) + self.memory(h)


def build(layer: int = 1) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    block = model.model.layers[layer]
    memory = UltraMem(dim=64, n_values=32**2, heads=2, topk=8, key_dim=32, value_dim=32, host_layers=2)
    block.mlp = MLPWithMemory(block.mlp, memory)
    return model


def main(steps: int = 30, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    text = (Path(__file__).resolve().parents[1] / "ultramem/assets/corpus_slice.txt").read_bytes()[:20000]
    data = torch.tensor(list(text), dtype=torch.long)
    model = build()
    opt = torch.optim.AdamW(param_groups(model, base_lr=3e-3), betas=(0.9, 0.95))
    losses = []
    for step in range(steps):
        i = torch.randint(0, len(data) - 64, (8,))
        x = torch.stack([data[j : j + 64] for j in i])
        loss = model(input_ids=x, labels=x).loss  # Llama shifts the labels itself
        (loss + aux_loss(model)).backward()
        set_lr(opt, step, steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_optimizer_step(model, step)
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    losses = main()
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
