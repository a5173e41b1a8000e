"""Side-stream overlap of memory spans (ultramem.distributed.overlap): the same numbers with
and without it, and the schedule it installs. One process, a one-rank group (the mesh needs
a process group). On CPU the schedule runs on :class:`HostStreams` (in order, traced); on a
GPU on real CUDA streams, with the sharded lookup's collectives forced on (one rank)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import workers

from ultramem.distributed.overlap import HostStreams, overlap_memory
from ultramem.distributed.parallelize import make_mesh, parallelize


def _one_rank(backend: str, tmp_path):
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def one_rank_group(tmp_path):
    """gloo: the CPU tests' models and mesh stay on the CPU even where a GPU is present."""
    yield from _one_rank("gloo", tmp_path)


@pytest.fixture
def one_rank_nccl(tmp_path):
    yield from _one_rank("nccl", tmp_path)


def _build(preset: str):
    """The preset with spans i:j, j > i (tiny-ultramem has 1:2/3:4; V2's default is every
    block i:i, which overlaps nothing, so V2 gets 1:2/3:4 too)."""
    cfg, _ = workers.build(preset)
    if preset == "tiny-ultramem-v2":
        cfg.model.memory.placement, cfg.model.memory.replace_ffn = "1:2/3:4", False
    torch.manual_seed(0)
    from ultramem.model.transformer import Transformer

    return cfg, Transformer.build(cfg.model)


def _grads(model):
    return {n: workers._full(p.grad) for n, p in model.named_parameters() if p.grad is not None}


def _step(model, x, y):
    out = model(x, y)
    workers.total_loss(out).backward()
    return out.logits.detach(), _grads(model)


def test_overlap_is_a_no_op_without_streams():
    cfg, model = _build("tiny-ultramem")
    assert overlap_memory(model) == 0  # CPU, default streams: nothing wrapped
    assert "forward" not in vars(model.memory[0])


@pytest.fixture
def one_thread():
    """CPU scatter-adds (the tables' gradients) sum in a thread-dependent order: one thread
    makes two runs of the same ops bit-identical."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _communicate(model) -> None:
    for layer in model.memory:
        layer.lookup.always_communicate = True  # the sharded lookup's collectives run on one rank


@pytest.mark.distributed
@pytest.mark.parametrize("partition", ["row", "col"])
@pytest.mark.parametrize("preset", ["tiny-ultramem", "tiny-ultramem-v2"])
def test_overlap_schedule_and_numbers_on_host(one_rank_group, one_thread, preset, partition):
    """The overlapped model (FSDP2 + sharded tables with their collectives, memory layers kept
    unsharded) computes bit for bit what the plain one does, logits and every gradient; each
    layer of span i:j is launched inside block i (before its FFN) and joined after block j."""
    cfg, ref = _build(preset)
    model = copy.deepcopy(ref)
    parallelize(ref, make_mesh(1), partition=partition)
    streams = HostStreams()
    for block in model.blocks:  # registered first: they run before the overlap's join hooks
        block.register_forward_pre_hook(lambda m, a: streams.trace.append(("enter", m.index)))
        block.register_forward_hook(lambda m, a, o: streams.trace.append(("exit", m.index)))
    plan = parallelize(model, make_mesh(1), partition=partition, overlap=streams)
    assert plan.overlapped == 2
    _communicate(ref)
    _communicate(model)
    streams.trace.clear()  # parallelize's probing forward ran the block hooks
    x, y = workers.batch(cfg, 0, 1)
    (want_logits, want), (got_logits, got) = _step(ref, x, y), _step(model, x, y)
    assert torch.equal(got_logits, want_logits)
    assert got.keys() == want.keys() and len(got) == len(list(ref.parameters()))
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert streams.trace == [("enter", 1), ("launch", 0), ("done", 0), ("exit", 1),
                             ("enter", 2), ("exit", 2), ("join", 0),
                             ("enter", 3), ("launch", 1), ("done", 1), ("exit", 3),
                             ("enter", 4), ("exit", 4), ("join", 1)]


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("partition", ["row", "col"])
@pytest.mark.parametrize("preset", ["tiny-ultramem", "tiny-ultramem-v2"])
def test_overlap_matches_one_stream(one_rank_nccl, preset, partition, dtype):
    """CUDA streams: logits and every gradient as on one stream (fp32: 1e-5; bf16 autocast: the
    tolerance of bf16 rounding, since kernels may pick other algorithms on another stream)."""
    cfg, ref = _build(preset)
    ref = ref.cuda()
    model = copy.deepcopy(ref)
    parallelize(ref, make_mesh(1), partition=partition)
    plan = parallelize(model, make_mesh(1), partition=partition, overlap=True)
    assert plan.overlapped == 2
    _communicate(ref)
    _communicate(model)
    x, y = (t.cuda() for t in workers.batch(cfg, 0, 2))
    outs = []
    for m in (ref, model):
        with torch.autocast("cuda", dtype=getattr(torch, dtype), enabled=dtype != "float32"):
            outs.append(_step(m, x, y))
    torch.cuda.synchronize()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == "float32" else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(outs[1][0], outs[0][0], **tol)
    assert outs[1][1].keys() == outs[0][1].keys()
    for name in outs[0][1]:
        torch.testing.assert_close(outs[1][1][name], outs[0][1][name], **tol, msg=name)


@pytest.mark.distributed
def test_root_unit_stays_gathered_after_forward(one_rank_group):
    """The root FSDP unit (embedding, tied head) keeps its gathered parameters after forward:
    the model returns a ModelOutput, on which FSDP2 cannot hook the re-gather for backward, so
    a resharded root leaves the tied head's backward reading freed storage (seen on CUDA)."""
    cfg, model = _build("tiny-ultramem")
    parallelize(model, make_mesh(1), partition="row")
    x, y = workers.batch(cfg, 0, 1)
    model(x, y)
    group = model._get_fsdp_state()._fsdp_param_group
    sizes = {fp._param_fqn: fp._unsharded_param.untyped_storage().size() for fp in group.fsdp_params}
    assert "embed_tokens.weight" in sizes and all(n > 0 for n in sizes.values()), sizes
