"""Memory tables sharded over gloo processes compute what one process computes
(ultramem.distributed: sharded_lookup, volume, parallelize, checkpoint).

2-process tests run in CI, and one 4-process launch (``test_four_processes``: the op with its
bytes, the first step on the 2 x 2 mesh, a 2 x 2 -> mp=4 -> one-process reshard); the
exhaustive 4-process ones (every preset x partition, five steps, on mp=2 x dp=2 and mp=4) are
``slow``: ``pytest -m slow tests/distributed`` (docs/distributed.md §7)."""

from __future__ import annotations

import pytest
import torch
import workers
from dist_helpers import assert_ok, launch

from ultramem.distributed import checkpoint as dckpt
from ultramem.distributed.volume import LookupShape, choose_partition, columnwise_bytes, rowwise_bytes
from ultramem.errors import CheckpointError

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sharded_lookup_op(tmp_path, world):
    """Outputs, every gradient and each collective's bytes (against the formulas)."""
    assert_ok(launch("op", world, tmp_path))


@pytest.mark.parametrize("world,mp", [(2, 2), pytest.param(4, 2, marks=pytest.mark.slow),
                                      pytest.param(4, 4, marks=pytest.mark.slow)])
def test_parallelized_model_matches_one_process(tmp_path, world, mp):
    assert_ok(launch("model", world, tmp_path, str(mp), timeout=600))


def test_pkm_and_memory_plus_tables_sharded(tmp_path):
    """PKM's value table and Memory+'s shared one, row- and column-wise over 2 ranks: first
    step (logits, every gradient) and five steps as one process (PKM with LayerNorm queries:
    its BatchNorm ones use per-rank batch statistics, workers.VARIANTS)."""
    assert_ok(launch("model", 2, tmp_path, "2", "tiny-pkm-layernorm", "tiny-memory-plus", timeout=600))


def test_four_processes(tmp_path):
    """One gloo launch of 4 ranks (scenario_quad): forward + every gradient = one process, bytes =
    formulas, and a checkpoint resharded 2 x 2 -> mp=4; then 4 -> 1 here: same logits."""
    assert_ok(launch("quad", 4, tmp_path))
    cfg, model = workers.build("tiny-ultramem-v2")
    assert dckpt.load(dckpt.latest_checkpoint(tmp_path / "run"), model)["tokens"] == 7
    torch.testing.assert_close(workers.full_logits(model, workers.batch(cfg, 99, 4)[0], 0, 1),
                               torch.load(tmp_path / "expect.pt")["logits"], **workers.TOL)


@pytest.mark.parametrize("preset,partition", [("tiny-ultramem", "row"), ("tiny-ultramem-v2", "col")])
def test_checkpoint_world2_to_world1(tmp_path, preset, partition):
    assert_ok(launch("save", 2, tmp_path, preset, "2", partition))
    expect = torch.load(tmp_path / "expect.pt")
    cfg, model = workers.build(preset)
    groups, opt = workers.optimizer(cfg, model)
    state = dckpt.load(dckpt.latest_checkpoint(tmp_path / "run"), model, opt)
    assert state == {"step": 2, "tokens": 123}
    torch.testing.assert_close(workers.full_logits(model, workers.batch(cfg, 99, 2)[0], 0, 1), expect["logits"],
                               **workers.TOL)
    for step, want in zip((2, 3), expect["losses"]):
        x, y = workers.batch(cfg, step, 2)
        assert abs(workers.train_step(cfg, model, groups, opt, step, x, y) - want) < 1e-4


@pytest.mark.parametrize("preset,partition", [("tiny-ultramem", "col"), ("tiny-ultramem-v2", "row")])
def test_checkpoint_world1_to_world2(tmp_path, preset, partition):
    cfg, model = workers.build(preset)
    groups, opt = workers.optimizer(cfg, model)
    for step in range(2):
        x, y = workers.batch(cfg, step, 2)
        workers.train_step(cfg, model, groups, opt, step, x, y)
    dckpt.save(tmp_path / "run", 2, model, opt, {"tokens": 123})
    expect = {"logits": workers.full_logits(model, workers.batch(cfg, 99, 2)[0], 0, 1), "losses": []}
    for step in (2, 3):
        x, y = workers.batch(cfg, step, 2)
        expect["losses"].append(workers.train_step(cfg, model, groups, opt, step, x, y))
    torch.save(expect, tmp_path / "expect.pt")
    assert_ok(launch("load", 2, tmp_path, preset, "2", partition))


def test_rank_killed_mid_save_keeps_previous_checkpoint(tmp_path):
    results = launch("kill", 2, tmp_path, "tiny-ultramem", "2", timeout=150)
    assert results[1][0] == 3, results[1][1][-3000:]  # rank 1 died where the test made it die
    assert results[0][0] != 0  # rank 0's save failed (or was killed hanging), never completed
    run = tmp_path / "run"
    assert [p.name for p in dckpt.list_checkpoints(run)] == ["step_0000001"]
    assert (run / dckpt.SUBDIR / ".tmp-step_0000002").is_dir()  # the interrupted save, ignored
    cfg, model = workers.build("tiny-ultramem")
    dckpt.load(dckpt.latest_checkpoint(run), model)
    torch.testing.assert_close(workers.full_logits(model, workers.batch(cfg, 99, 2)[0], 0, 1),
                               torch.load(tmp_path / "expect.pt")["logits"], **workers.TOL)
    # a corrupted shard is refused with a one-line error
    shard = next((run / dckpt.SUBDIR / "step_0000001").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        dckpt.load(dckpt.latest_checkpoint(run), model)


def test_formulas_pick_the_cheaper_partition():
    """Narrow rows with many selections -> column-wise is worse; wide rows -> row-wise is worse."""
    many_narrow = LookupShape(tokens=1024, selections=256, cores=2, blocks=1, value_dim=64)
    few_wide = LookupShape(tokens=1024, selections=8, cores=1, blocks=1, value_dim=4096)
    assert choose_partition([many_narrow], 8) == "row"
    assert choose_partition([few_wide], 8) == "col"
    # one rank: nothing moves
    assert sum(rowwise_bytes(few_wide, 1).values()) == 0 == sum(columnwise_bytes(few_wide, 1).values())


def test_bad_settings_are_one_line_config_errors(tmp_path):
    from ultramem.config import TrainConfig
    from ultramem.distributed.parallelize import make_mesh, parallelize
    from ultramem.distributed.sharded_lookup import ShardedLookup, _core_slice
    from ultramem.errors import ConfigError

    with pytest.raises(ConfigError, match="partition='diag'"):
        ShardedLookup("diag", None)
    with pytest.raises(ConfigError, match="cores=3"):
        _core_slice(3, 2, 0)
    with pytest.raises(ConfigError, match="train.parallel=fsdp"):
        TrainConfig(memory_parallel=2).validate()
    with pytest.raises(ConfigError, match="memory_partition"):
        TrainConfig(parallel="fsdp", memory_partition="diag").validate()
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match="mp=2 must divide the world size 1"):
            make_mesh(2)
        cfg, model = workers.build("tiny-ultramem")
        with pytest.raises(ConfigError, match="allowed: auto, row, col"):
            parallelize(model, make_mesh(1), partition="diag")
        with pytest.raises(ConfigError, match="no such table; tables: memory.0.values, memory.1.values"):
            parallelize(model, make_mesh(1), partition={"memory.9.values": "row"})
    finally:
        dist.destroy_process_group()


def test_non_finite_weights_are_never_saved(tmp_path):
    """As the full-weight checkpoints: a NaN weight is refused, nothing written or rotated."""
    cfg, model = workers.build("tiny-ultramem")
    dckpt.save(tmp_path / "run", 1, model)
    with torch.no_grad():
        model.memory[0].values[3, 1] = float("nan")
    with pytest.raises(CheckpointError, match=r"refusing to save step 2: non-finite weights \(memory.0.values\); "
                                              r"the last good checkpoint is kept: .*step_0000001"):
        dckpt.save(tmp_path / "run", 2, model, keep_last=1)
    assert [p.name for p in dckpt.list_checkpoints(tmp_path / "run")] == ["step_0000001"]
    assert not list((tmp_path / "run" / dckpt.SUBDIR).glob(".tmp-*"))
