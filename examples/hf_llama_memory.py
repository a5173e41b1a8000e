"""An UltraMem layer beside the MLP of a Hugging Face Llama (built from a config: random weights,
offline), trained a few steps on bytes.

    python examples/hf_llama_memory.py           # needs transformers (pip install "ultramem[hf]")
"""

import torch
from byte_training import train  # the loop shared by the examples (examples/byte_training.py)
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ultramem.nn import UltraMem


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
    model = build()
    # Llama shifts the labels itself: its loss takes the inputs as labels
    return train(model, lambda x, y: model(input_ids=x, labels=x).loss, steps)


if __name__ == "__main__":
    losses = main()
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
