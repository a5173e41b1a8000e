"""The decode engine and ``generate``: greedy equals a cache-free loop, seeded sampling,
stop tokens, the sampling rules, the CLI; GPU: graph replay and overlap equal eager."""

import shutil

import pytest
import torch
from torch._dynamo.utils import counters

import ultramem
from ultramem import checkpoint as ckpt
from ultramem.cli import main
from ultramem.data.tokenizer import Tokenizer, default_tokenizer_path
from ultramem.errors import ConfigError
from ultramem.inference.engine import Engine
from ultramem.inference.sampling import Sampling, sample
from ultramem.model.attention import Attention
from ultramem.model.transformer import Transformer
from ultramem.presets import get_preset

TINY = ["tiny-dense", "tiny-moe", "tiny-pkm", "tiny-memory-plus", "tiny-ultramem", "tiny-ultramem-v2"]


def tiny(name: str, device: str = "cpu") -> Transformer:
    model = Transformer.build(get_preset(name).model, device).eval()
    with torch.no_grad():
        for layer in model.memory:
            if getattr(layer, "query_conv", None) is not None:
                layer.query_conv.weight.normal_()
    return model


@torch.no_grad()
def greedy_reference(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full forwards, no cache at all."""
    seq = list(prompt)
    dev = model.embed_tokens.weight.device
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq], device=dev)).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-ultramem", "tiny-ultramem-v2", "tiny-moe"])
def test_batched_ragged_greedy_equals_cache_free_loop(name):
    model = tiny(name)
    prompts = [torch.randint(0, 8192, (n,)).tolist() for n in (5, 1, 11)]
    out = ultramem.generate(model, prompts, 6, temperature=0)
    assert out.ids == [greedy_reference(model, p, 6) for p in prompts]
    assert out.result.new_tokens == 18 and out.tokens_per_s > 0


def test_chunked_prefill_and_bucket_padding():
    """Five prompts go in a bucket of 8 (three padding rows), prefilled in chunks of 3."""
    model = tiny("tiny-ultramem")
    prompts = [torch.randint(0, 8192, (n,)).tolist() for n in (7, 2, 4, 9, 3)]
    engine = Engine(model, max_batch=8, max_len=16, sampling=Sampling(0.0), prefill_chunk=3)
    got = engine.generate_ids(prompts, 4)
    assert engine.bucket(5).b == 8
    assert got.ids == [greedy_reference(model, p, 4) for p in prompts]
    again = engine.generate_ids(prompts[:2], 4)  # reuse: the state is reset between calls
    assert again.ids == got.ids[:2]


def test_seeded_sampling_and_per_sequence_stop():
    model = tiny("tiny-dense")
    prompts = [[1, 2, 3], [4, 5]]
    a = ultramem.generate(model, prompts, 12, temperature=1.0, top_k=20, seed=3)
    b = ultramem.generate(model, prompts, 12, temperature=1.0, top_k=20, seed=3)
    c = ultramem.generate(model, prompts, 12, temperature=1.0, top_k=20, seed=4)
    assert a.ids == b.ids and a.ids != c.ids
    stop_tok = a.ids[0][4]
    first = a.ids[0].index(stop_tok)
    s = ultramem.generate(model, prompts, 12, temperature=1.0, top_k=20, seed=3, stop=[[stop_tok], []])
    assert s.ids[0] == a.ids[0][:first] and s.ids[1] == a.ids[1]


def test_sampling_rules():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(20000, 5, generator=g)
    draws = sample(logits.expand(20000, 5), Sampling(1.0, 0, 1.0), noise)
    freq = torch.bincount(draws, minlength=5).float() / 20000
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.015), freq  # Gumbel-max = softmax
    hot = sample(logits.expand(20000, 5), Sampling(0.5, 2, 1.0), noise[:, :2])
    assert set(hot.unique().tolist()) == {0, 1}  # top-2 only
    p = logits[0].softmax(-1)  # top_p just over the first token's mass: only token 0
    assert sample(logits.expand(100, 5), Sampling(1.0, 0, float(p[0]) - 1e-3), noise[:100]).eq(0).all()
    two = sample(logits.expand(20000, 5), Sampling(1.0, 0, float(p[0] + p[1]) - 1e-3), noise)
    assert set(two.unique().tolist()) == {0, 1}
    assert sample(logits, Sampling(0.0), None).item() == 0
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0)):
        with pytest.raises(ConfigError):
            Sampling(**bad)


def test_errors_are_config_errors():
    model = tiny("tiny-dense")
    with pytest.raises(ConfigError, match="max_seq_len=256"):
        ultramem.generate(model, [[1] * 250], 10)
    with pytest.raises(ConfigError, match="tokenizer"):
        ultramem.generate(model, ["hello"], 4)
    with pytest.raises(ConfigError, match="at least one token"):
        ultramem.generate(model, [[1], []], 4)
    with pytest.raises(ConfigError, match="CUDA"):
        Engine(model, graphs=True)


def test_cli_generate_prompts_file(tmp_path, capsys):
    cfg = get_preset("tiny-ultramem")
    model = Transformer.build(cfg.model).eval()
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, 1, model.state_dict(), {}, {"step": 1}, cfg.to_dict())
    shutil.copy(default_tokenizer_path(), run / "tokenizer.json")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Fellow-Citizens of the Senate\n\nWe the People\n")
    assert main(["generate", str(run), "--prompts", str(prompts), "--max-new", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("Fellow-Citizens of the Senate") and lines[-1].startswith("We the People")
    assert "tokens/s" in out.err and "2 prompt(s)" in out.err
    tok = Tokenizer(run / "tokenizer.json")
    want = greedy_reference(model, tok.encode("We the People"), 5)
    cut = want.index(tok.eot_id) if tok.eot_id in want else 5
    assert lines[-1] == "We the People" + tok.decode(want[:cut])
    assert main(["generate", str(run), "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("name", TINY)
def test_gpu_graph_and_overlap_equal_eager(name):
    torch.manual_seed(0)
    model = tiny(name, "cuda")
    prompts = [torch.randint(0, 8192, (n,)).tolist() for n in (5, 1, 11)]
    eager = Engine(model, 4, 32, Sampling(0.0), graphs=False).generate_ids(prompts, 12)
    graph = Engine(model, 4, 32, Sampling(0.0), graphs=True)
    got = graph.generate_ids(prompts, 12)
    assert got.graphed or name == "tiny-moe", "decode step was not captured"
    assert got.ids == eager.ids
    over = Engine(model, 4, 32, Sampling(0.0), graphs=True, overlap=True).generate_ids(prompts, 12)
    assert over.ids == eager.ids


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-ultramem"])
def test_compiled_step_equals_eager_engine(name):
    """``compile``: the decode step through torch.compile (the eager backend on the CPU: the
    tracing, guards and recompiles are what this checks) gives the eager engine's tokens."""
    torch._dynamo.reset()
    model = tiny(name)
    prompts = [torch.randint(0, 8192, (n,)).tolist() for n in (5, 1, 3)]
    want = Engine(model, 4, 16, Sampling(0.0)).generate_ids(prompts, 5)
    eng = Engine(model, 4, 16, Sampling(0.0), compile={"backend": "eager"})  # one bucket: 4
    assert eng.forward is not model
    assert eng.generate_ids(prompts, 5).ids == want.ids
    graphs = counters["stats"]["unique_graphs"]
    eng.generate_ids(prompts, 9)  # more steps, new positions: no recompile (no guard on the step)
    assert counters["stats"]["unique_graphs"] == graphs
    assert ultramem.generate(model, prompts[:1], 5, temperature=0, compile={"backend": "eager"}).ids == want.ids[:1]


def test_compiled_step_leaves_memory_layers_out_of_the_graph():
    """Under ``compile`` the memory layers run eagerly (their Triton decode kernels traced by
    Dynamo gave other tokens on the H200): no node of any compiled graph comes from
    ``model.memory``, while the blocks' nodes are there."""
    torch._dynamo.reset()
    model = tiny("tiny-ultramem")
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    prompts = [torch.randint(0, 8192, (n,)).tolist() for n in (5, 1, 3)]
    want = Engine(model, 4, 16, Sampling(0.0)).generate_ids(prompts, 4)
    assert Engine(model, 4, 16, Sampling(0.0), compile={"backend": backend}).generate_ids(prompts, 4).ids == want.ids
    classes = {cls for gm in graphs for n in gm.graph.nodes
               for _, cls in (n.meta.get("nn_module_stack") or {}).values()}
    assert Attention in classes  # the blocks were compiled
    memory_only = {type(m) for m in model.memory[0].modules()} - {type(m) for m in model.blocks.modules()}
    assert memory_only and not memory_only & classes, memory_only & classes  # e.g. CausalQueryConv


def test_compile_refuses_its_own_graphs_and_overlap():
    model = tiny("tiny-dense")
    with pytest.raises(ConfigError, match="captures CUDA graphs itself"):
        Engine(model, compile={"mode": "reduce-overhead"})
    with pytest.raises(ConfigError, match="side stream"):
        Engine(model, overlap=True, compile=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-dense", "tiny-ultramem", "tiny-moe"])
def test_gpu_compiled_graph_equals_eager(name):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = tiny(name, "cuda")
    prompts = [torch.randint(0, 8192, (n,)).tolist() for n in (5, 1, 11)]
    eager = Engine(model, 4, 32, Sampling(0.0), graphs=False).generate_ids(prompts, 12)
    got = Engine(model, 4, 32, Sampling(0.0), graphs=True, compile=True).generate_ids(prompts, 12)
    assert got.graphed or name == "tiny-moe"
    assert got.ids == eager.ids
