"""Side-stream overlap of memory spans (ultramem.distributed.overlap): same numbers with and
without it. One process, a one-rank group (the mesh needs a process group)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import workers

from ultramem.distributed.overlap import overlap_memory
from ultramem.distributed.parallelize import make_mesh, parallelize


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _grads(model):
    return {n: workers._full(p.grad) for n, p in model.named_parameters() if p.grad is not None}


def test_overlap_is_a_no_op_without_streams():
    cfg, model = workers.build("tiny-ultramem")
    assert overlap_memory(model) == 0  # CPU: nothing wrapped


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.parametrize("preset", ["tiny-ultramem", "tiny-ultramem-v2"])
def test_overlap_matches_one_stream(one_rank_group, preset):
    cfg, ref = workers.build(preset)
    ref = ref.cuda()
    model = copy.deepcopy(ref)
    parallelize(ref, make_mesh(1), partition="col")
    parallelize(model, make_mesh(1), partition="col", overlap=True)
    x, y = (t.cuda() for t in workers.batch(cfg, 0, 2))
    outs = []
    for m in (ref, model):
        out = m(x, y)
        workers.total_loss(out).backward()
        outs.append((out.logits.detach(), _grads(m)))
    torch.cuda.synchronize()
    torch.testing.assert_close(outs[1][0], outs[0][0])
    assert outs[1][1].keys() == outs[0][1].keys()
    for name in outs[0][1]:
        torch.testing.assert_close(outs[1][1][name], outs[0][1][name], msg=name)
