"""The trainer resumes at another world size with the same next-step losses as an
uninterrupted run: world 1 (full-weight checkpoint) -> world 2 sharded (``train.parallel=fsdp``,
tables over both ranks; its checkpoint is DCP) -> world 1 again, same global batch throughout
(``train.batch_size`` is per process). One ``torchrun`` launch per preset."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import losses, torchrun, trainer_overrides

from ultramem import checkpoint as ckpt
from ultramem.distributed import checkpoint as dckpt
from ultramem.errors import ConfigError
from ultramem.resolve import load_config
from ultramem.train.trainer import train

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("preset", ["tiny-ultramem", "tiny-ultramem-v2"])
def test_resume_across_world_sizes(slice_data, tmp_path, preset):
    one = trainer_overrides(slice_data, **{"train.ckpt_every": 1})
    train(load_config(preset, overrides=one), tmp_path / "ref", progress=False)  # uninterrupted, 4 steps
    want = losses(tmp_path / "ref")
    run = tmp_path / "run"

    train(load_config(preset, overrides=one), run, stop_after=2, progress=False)  # world 1: steps 1-2
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000001", "step_0000002"]

    # 1 -> 2: the full checkpoint loads before sharding; step 3 saved as DCP (each rank its shards)
    torchrun(preset, run, trainer_overrides(slice_data, **{
        "train.ckpt_every": 1, "train.batch_size": 2, "train.parallel": "fsdp", "train.memory_parallel": 2}),
        "--stop-after", "3")
    assert [p.name for p in dckpt.list_checkpoints(run)] == ["step_0000003"]
    assert len(list((dckpt.list_checkpoints(run)[0]).glob("*.distcp"))) == 2
    # keep_last=2 counts both kinds: the full step 1 is gone, step 2 kept
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000002"]

    # the global batch must be kept: half of it is refused, naming the field
    with pytest.raises(ConfigError, match="train.batch_size x processes: 4 -> 2"):
        train(load_config(preset, overrides=trainer_overrides(slice_data, **{"train.batch_size": 2})), run,
              progress=False)

    # 2 -> 1: the DCP checkpoint loads into the unsharded model (weights and AdamW moments)
    train(load_config(preset, overrides=one), run, progress=False)
    assert dckpt.latest_any(run).name == "step_0000004" and not dckpt.is_dcp(dckpt.latest_any(run))
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(want), rtol=1e-4, atol=1e-4)
