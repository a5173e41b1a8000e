"""Measurements of the second decode sweep (``benchmarks/decode_suite.py``) beyond the whole
step: the bandwidth ceilings, where a step's time goes (per part), a memory layer alone (ours
and lucidrains' ``ultra-mem``) and Hugging Face ``generate()`` in this process.

Every time is a CUDA-graph replay (``ultramem.inference.bench.time_replays``: median of
replays after warm-up, CUDA events) unless a row says ``"graphed": false``. A part is timed
over all of the model's layers of that part in one graph, each layer on its own weights, so
the caches see what they see in the whole step (one layer's weights replayed alone would stay
in the 60 MB L2).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ultramem.inference import bench
from ultramem.inference.engine import Engine
from ultramem.inference.sampling import Sampling
from ultramem.model.transformer import Transformer

SCALE = 1  # divides the ceilings' buffer sizes (the CPU dry run sets it)


def cpu_timer(fn: Callable[[], None], calls: int = 20, reps: int = 15) -> float:
    """Stand-in for ``bench.time_replays`` in the CPU dry run: median ms per call, host clock."""
    fn()
    times = []
    for _ in range(min(reps, 3)):
        t = time.perf_counter()
        for _ in range(min(calls, 2)):
            fn()
        times.append((time.perf_counter() - t) * 1e3 / min(calls, 2))
    return sorted(times)[len(times) // 2]


# ---- ceilings --------------------------------------------------------------------------------
def clocks_up(seconds: float) -> None:
    """Busy the GPU with bf16 GEMMs for ``seconds`` so the first timed rows run at full clocks."""
    warm = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    t = time.time()
    while time.time() - t < seconds:
        warm @ warm
    torch.cuda.synchronize()


def ceilings(device: str = "cuda") -> dict:
    """Device-memory ceilings, each with how it counts bytes:

    - ``copy_GBps``: ``y.copy_(x)`` of 1 GiB and 4 GiB bf16 (the larger), bytes read + written;
    - ``read_GBps``: ``x.sum()`` over 4 GiB bf16, bytes read (the output is 2 bytes);
    - ``gemv_GBps``: ``F.linear`` of one row through a 1 GiB ``[16384, 32768]`` bf16 weight
      (cuBLAS; a batch-1 projection, as in decode), weight bytes read.
    """
    out: dict = {}
    copies = []
    for numel in ((1 << 29) // SCALE, (1 << 31) // SCALE):
        x = torch.randn(numel, device=device, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        ms = bench.time_replays(lambda x=x, y=y: y.copy_(x), calls=5, reps=10)
        copies.append(2 * x.nbytes / ms / 1e6)
        del y
    out["copy_GBps"] = round(max(copies), 1)
    out["copy_GBps_1GiB"] = round(copies[0], 1)
    ms = bench.time_replays(lambda: x.sum(), calls=5, reps=10)
    out["read_GBps"] = round(x.nbytes / ms / 1e6, 1)
    w = torch.randn(16384 // SCALE, 32768, device=device, dtype=torch.bfloat16)
    v = torch.randn(1, 32768, device=device, dtype=torch.bfloat16)
    ms = bench.time_replays(lambda: F.linear(v, w), calls=5, reps=10)
    out["gemv_GBps"] = round(w.nbytes / ms / 1e6, 1)
    out["counts"] = {"copy_GBps": "read + write bytes of y.copy_(x), bf16, max of 1 GiB and 4 GiB",
                     "read_GBps": "bytes read by x.sum() over 4 GiB bf16",
                     "gemv_GBps": "weight bytes read by F.linear of 1 row through a 1 GiB bf16 weight"}
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# ---- bytes of a set of modules ------------------------------------------------------------------
def part_bytes(modules: list[nn.Module], batch: int, elem: int = 2) -> int:
    """Bytes ``modules`` must read for ``batch`` tokens: every weight once, row-gathered tables
    (``bench.GATHERED``) by their expected distinct rows (as ``bench.step_bytes``)."""
    gathered: dict[int, float] = {}
    plain: dict[int, int] = {}
    for top in modules:
        for layer in top.modules():
            rule = bench.GATHERED.get(type(layer))
            for p, rows, per_token in rule(layer) if rule else []:
                if p is not None:
                    row = p.numel() // p.shape[0] * elem
                    gathered[id(p)] = gathered.get(id(p), 0.0) + bench.distinct(rows, per_token * batch) * row
        for p in top.parameters():
            plain[id(p)] = p.numel() * elem
    return int(sum(gathered.values()) + sum(v for k, v in plain.items() if k not in gathered))


# ---- where a step's time goes ---------------------------------------------------------------------
@torch.no_grad()
def step_parts(model: Transformer, batch: int, kv: int, sub_parts: bool = True, attention: str = "auto") -> dict:
    """Serial time of each part of one decode step of ``batch`` sequences over ``kv`` cached
    positions: ``attention`` (every block's input norm, q/k/v/o projections, rotary, cache
    write, masked SDPA), ``ffn`` (post-attention norm + FFN or MoE), ``memory`` (every memory
    layer; with ``sub_parts`` also ``memory.scores``: query projection + norm + key scores, and
    ``memory.retrieval``: those + top-m; the rest is lookup + projections), ``head`` (final
    norm, LM head, greedy pick) and ``embed``. ``glue`` is the whole step minus the parts
    (residual adds, launches between parts). Inputs are random ``[B, 1, D]`` activations;
    ``attention``: how the step reads the cache (``Engine``'s switch)."""
    engine = Engine(model, batch, kv, Sampling(0.0), graphs=False, attention=attention)
    bk = engine.bucket(batch)
    st = bk.state
    st.kv_len = kv
    st.pos.fill_(kv - 1)
    bk.tokens.random_(0, model.cfg.vocab_size)  # distinct tokens: an MoE step routes them apart
    w = model.embed_tokens.weight
    x = torch.randn(batch, 1, model.cfg.d_model, device=w.device, dtype=w.dtype) * 0.5
    positions = torch.full((batch, 1), kv - 1, device=w.device, dtype=torch.long)  # step() moves st.pos
    head_w = model.lm_head.weight if model.lm_head is not None else w
    blocks = list(model.blocks)

    def attention() -> None:
        for i, blk in enumerate(blocks):
            blk.attn(blk.input_layernorm(x), st.kv[i], positions, kv)

    def ffn() -> None:
        for i, blk in enumerate(blocks):
            if blk.ffn is not None:
                blk.ffn(blk.post_attention_layernorm(x), st.ffn[i])

    def memory() -> None:
        for n, mem in enumerate(model.memory):
            mem(x, st.memory[n])

    def scores() -> None:
        for mem in model.memory:
            mem.retrieval.per_rank_scores(x.view(batch, -1))

    def retrieval() -> None:
        for n, mem in enumerate(model.memory):
            mem.retrieve(x, st.memory[n])

    def head() -> None:
        F.linear(model.norm(x), head_w).argmax(-1)

    def embed() -> None:
        model.embed_tokens(bk.tokens.view(-1, 1))

    def step() -> None:
        st.pos.fill_(kv - 1)
        engine._step(bk)

    fns: dict[str, tuple[Callable[[], None], list[nn.Module]]] = {
        "attention": (attention, [b.attn for b in blocks] + [b.input_layernorm for b in blocks]),
        "ffn": (ffn, [b.ffn for b in blocks if b.ffn is not None] + [b.post_attention_layernorm for b in blocks]),
        "head": (head, [model.norm, model.lm_head or model.embed_tokens]),
        "embed": (embed, []),
    }
    if len(model.memory):
        fns["memory"] = (memory, list(model.memory))
        if sub_parts and hasattr(model.memory[0], "retrieval"):
            fns["memory.scores"] = (scores, [])
            fns["memory.retrieval"] = (retrieval, [])
    out: dict = {"batch": batch, "kv": kv, "step_ms": round(bench.time_replays(step, 5, 9), 4), "parts": {}}
    kv_bytes = len(blocks) * 2 * batch * kv * model.cfg.kv_heads * model.cfg.head_dim * 2
    for name, (fn, mods) in fns.items():
        ms = bench.time_replays(fn, 5, 9)
        b = part_bytes(mods, batch) + (kv_bytes if name == "attention" else 0)
        if name == "head" and model.lm_head is None:
            b = part_bytes([model.norm], batch) + w.numel() * 2
        out["parts"][name] = {"ms": round(ms, 4), "bytes": b if mods else None,
                              "GBps": round(b / ms / 1e6, 1) if mods else None}
    top = [k for k in out["parts"] if "." not in k]
    out["glue_ms"] = round(out["step_ms"] - sum(out["parts"][k]["ms"] for k in top), 4)
    if w.is_cuda:
        torch.cuda.empty_cache()
    return out


# ---- one memory layer alone: ours and lucidrains' ultra-mem --------------------------------------
@torch.no_grad()
def layer_ms(fn: Callable[[], torch.Tensor]) -> tuple[float, bool]:
    """Graph-replay ms of ``fn``, or eager CUDA-event ms where it does not capture."""
    try:
        return bench.time_replays(fn, 10, 9), True
    except RuntimeError:
        if not torch.cuda.is_available():
            raise
        torch.cuda.synchronize()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(20):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 20, False


@torch.no_grad()
def our_layer(model: Transformer, batches: list[int]) -> list[dict]:
    """``model.memory[0]`` on ``[B, 1, D]`` tokens (its decode state), graphed and eager."""
    mem, rows = model.memory[0], []
    w = model.embed_tokens.weight
    for b in batches:
        st = mem.new_state(b, w.device, w.dtype)
        x = torch.randn(b, 1, model.cfg.d_model, device=w.device, dtype=w.dtype)
        ms, graphed = layer_ms(lambda x=x, st=st: mem(x, st))
        rows.append({"layer": "ultramem (ours, ultramem-1.6b-x12 layer 0)", "batch": b, "ms": round(ms, 4),
                     "graphed": graphed, "value_rows": mem.values.shape[0], "value_dim": mem.values.shape[1],
                     "topm": mem.cfg.topk, "heads": mem.cfg.heads})
    return rows


@torch.no_grad()
def lucidrains_layer(batches: list[int], dim: int = 2048, num_memories: int = 2534**2, dim_values: int = 1024,
                     dim_queries_keys: int = 448, device: str = "cuda") -> list[dict]:
    """lucidrains' ``ultra_mem.UltraMem`` (PyPI ``ultra-mem``) at ultramem-1.6b-x12's layer
    size: 2 heads (cores) of 1,605,289 rows x 1024 each (3.2 M rows in all, as ours), value
    expansion 4, top 42, query/key dim 448, Tucker rank 2, its causal query conv (kernel 5:
    it needs an odd one), output projection on; bf16, eval (the SVD of its 2 x 2 x 2 cores, which
    it recomputes every forward, in fp32: there is no bf16 SVD; bf16 as the default dtype while it
    runs, since its value-expansion buffer is a default-dtype ``zeros``)."""
    from ultra_mem import UltraMem as LucidUltraMem  # noqa: PLC0415

    with torch.device(device):  # its memories are drawn in __init__: on the GPU, not the host
        layer = LucidUltraMem(dim=dim, dim_values=dim_values, num_memories=num_memories, topk=42,
                              dim_queries_keys=dim_queries_keys, core_rank=2, core_heads=2, value_expansion=4,
                              proj_out=True)
    layer = layer.to(torch.bfloat16).eval()
    rows, svd = [], torch.svd

    def svd_fp32(a: torch.Tensor, *args, **kw):  # no bf16 SVD kernel: its 2x2 cores in fp32
        return tuple(t.to(a.dtype) for t in svd(a.float(), *args, **kw))

    for b in batches:
        x = torch.randn(b, 1, dim, device=device, dtype=torch.bfloat16)
        torch.svd = svd_fp32
        torch.set_default_dtype(torch.bfloat16)  # its value-expansion buffer is a default-dtype zeros()
        try:
            ms, graphed = layer_ms(lambda x=x: layer(x))
        finally:
            torch.svd = svd
            torch.set_default_dtype(torch.float32)
        rows.append({"layer": "lucidrains ultra-mem 0.1.2", "batch": b, "ms": round(ms, 4), "graphed": graphed,
                     "value_rows": 2 * layer.num_virtual_mems, "value_dim": dim_values, "topm": 42, "heads": 2})
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---- Hugging Face generate(), in this process --------------------------------------------------------
# transformers models of our presets' shapes (random bf16 weights): config class, shape, label
HF_MODELS = {
    # SwiGLU width 5504 gives dense-1.6b's 1.61 B parameters (its GELU MLP is 4 D wide)
    "llama": ("LlamaConfig", "LlamaForCausalLM", "llama (dense-1.6b shape)",
              {"vocab_size": 50432, "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 32,
               "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 2048,
               "tie_word_embeddings": True}),
    # olmoe-1b-7b: 16 blocks, 64 experts of width 1024, top-8 (OLMoE-1B-7B's published config)
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", "olmoe (olmoe-1b-7b shape)",
              {"vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,
               "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 4096,
               "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False}),
}


@torch.no_grad()
def hf_generate(settings: list[tuple[str, dict, int]], time_left: Callable[[], float], prompt_len: int = 32,
                device: str = "cuda", small: dict | None = None, arch: str = "llama", batch: int = 1) -> list[dict]:
    """``generate`` of a transformers model of one of our presets' shapes (``HF_MODELS[arch]``,
    random bf16 weights), ``batch`` prompts of ``prompt_len`` tokens, greedy; one row per setting
    ``(label, generate kwargs, new tokens)``. A warm-up call (8 tokens; for a compiled static cache
    the timed length, which it compiles for) precedes each timed call; a setting is skipped when
    ``time_left()`` is under 20 s (60 s for a static cache, which compiles). ``small``: config
    overrides (dry run)."""
    import transformers  # noqa: PLC0415

    config_cls, model_cls, name, shape = HF_MODELS[arch]
    cfg = getattr(transformers, config_cls)(**{**shape, **(small or {})})
    with torch.device(device):
        model = getattr(transformers, model_cls)(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for label, kw, n in settings:
        compiles = kw.get("cache_implementation") == "static" and not kw.get("disable_compile")
        if time_left() < (60 if compiles else 20):
            rows.append({"model": name, "batch": batch, "engine": label, "skipped": "time budget"})
            continue
        try:
            t0 = time.perf_counter()
            # a static cache is sized by max_new_tokens: warm up (compile) at the timed length, or
            # the timed call compiles again (decode-h200-e-hf.json: 3.6 tokens/s, a recompile)
            warm_n = n if compiles else 8
            model.generate(ids, max_new_tokens=warm_n, min_new_tokens=warm_n, do_sample=False, **kw)
            sync()
            warm = time.perf_counter() - t0
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
            sync()
            dt = time.perf_counter() - t
            rows.append({"model": name, "batch": batch, "engine": label, "new_tokens": n,
                         "tokens_per_s": round(batch * (out.shape[1] - ids.shape[1]) / dt, 1),
                         "warmup_s": round(warm, 1), "transformers": transformers.__version__})
        except Exception as err:  # noqa: BLE001  (record and go on)
            rows.append({"model": name, "batch": batch, "engine": label, "error": f"{type(err).__name__}: {str(err)[:200]}"})
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows
