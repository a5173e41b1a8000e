"""The trainer on two gloo processes (torchrun) computes what one process computes (same
global batch), with DDP and with FSDP (``ultramem.distributed.wrap``): the dense tiny model,
tiny UltraMem and tiny UltraMemV2 (value tables split over both ranks, ``memory_parallel=2``).
FSDP runs checkpoint through DCP (``ultramem.distributed.checkpoint``; resume at
another world size: test_trainer_resume.py). The memory presets under DDP (nothing
memory-specific: DDP averages every gradient) are ``slow`` (about a minute each on the 2-core CI machine): ``pytest -m slow tests/distributed``."""

import pytest
import torch
from dist_helpers import losses, torchrun, trainer_overrides

from ultramem import checkpoint as ckpt
from ultramem.distributed import checkpoint as dckpt
from ultramem.inference.load import load_run
from ultramem.resolve import load_config
from ultramem.train.trainer import train

DENSE = {"model.vocab_size": 8192, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2,
         "model.max_seq_len": 64, "model.ffn.hidden": 128}


CASES = [
    pytest.param(None, "ddp", DENSE, id="dense-ddp"),
    pytest.param(None, "fsdp", DENSE, id="dense-fsdp"),
    pytest.param("tiny-ultramem", "ddp", {}, id="ultramem-ddp", marks=pytest.mark.slow),
    pytest.param("tiny-ultramem", "fsdp", {"train.memory_parallel": 2}, id="ultramem-fsdp-mp2"),
    pytest.param("tiny-ultramem-v2", "ddp", {}, id="ultramem-v2-ddp", marks=pytest.mark.slow),
    pytest.param("tiny-ultramem-v2", "fsdp", {"train.memory_parallel": 2}, id="ultramem-v2-fsdp-mp2"),
]


@pytest.mark.distributed
@pytest.mark.parametrize("preset,parallel,extra", CASES)
def test_two_processes_match_one(slice_data, tmp_path, preset, parallel, extra):
    steps = 4
    single = trainer_overrides(slice_data, **{k: v for k, v in extra.items() if k != "train.memory_parallel"})
    train(load_config(preset, overrides=single), tmp_path / "one", progress=False)
    torchrun(preset, tmp_path / "two", trainer_overrides(slice_data, **{
        **extra, "train.batch_size": 2, "train.parallel": parallel, "train.ckpt_every": 2}))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")),
                               rtol=1e-4, atol=1e-4)
    # sharded (FSDP) runs write DCP checkpoints, DDP ones full weights; both load on one process
    assert load_run(tmp_path / "two").step == steps
    kind = dckpt if parallel == "fsdp" else ckpt
    assert [p.name for p in kind.list_checkpoints(tmp_path / "two")] == ["step_0000002", "step_0000004"]


def test_memory_overlap_needs_fsdp():
    from ultramem.errors import ConfigError

    with pytest.raises(ConfigError, match="train.memory_overlap=true needs train.parallel=fsdp"):
        load_config("tiny-ultramem", overrides=["train.memory_overlap=true"])
    assert load_config("tiny-ultramem", overrides=["train.memory_overlap=true", "train.parallel=fsdp"]).train.memory_overlap


def test_wrap_hands_memory_overlap_to_parallelize(monkeypatch):
    """``train.memory_overlap`` reaches ``parallelize(overlap=...)`` (which installs the side
    streams on CUDA: tests/distributed/test_overlap.py)."""
    import ultramem.distributed.parallelize as par
    from ultramem import distributed
    from ultramem.model.transformer import Transformer

    seen = {}
    monkeypatch.setattr(par, "make_mesh", lambda mp, device_type: ("mesh", mp, device_type))
    monkeypatch.setattr(par, "parallelize", lambda model, mesh, partition, overlap: seen.update(
        mesh=mesh, partition=partition, overlap=overlap))
    model = Transformer.build(load_config("tiny-ultramem").model)
    d = distributed.Dist(0, 2, 0, torch.device("cpu"))
    assert distributed.wrap(model, d, "fsdp", 2, "col", True) is model
    assert seen == {"mesh": ("mesh", 2, "cpu"), "partition": "col", "overlap": True}
