"""Golden loss curves of the memory models: 30 CPU steps of tiny-ultramem, tiny-ultramem-v2,
tiny-pkm and tiny-memory-plus (shrunk to 2 blocks, d 64) match the committed curves. The PKM and
Memory+ curves were written by the code before they shared ``layers/tdqkr.py`` (5d32449).

Regenerate after an intended numerical change:
``UPDATE_GOLDEN=1 python -m pytest tests/train/test_golden_memory.py -q``."""

import json
import os
from pathlib import Path

import pytest
from train_helpers import tiny_overrides

from ultramem.resolve import load_config
from ultramem.train.trainer import train

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
# tiny-ultramem's curve differs across CPUs by more than the others' (its top-m picks amplify
# rounding): on an AMD EPYC against the committed curve, up to 3.5e-3 relative from step 3 on
# (session 7), in a curve that still tracks the golden one (last loss 6.964 vs 6.956)
REL_TOL = {"tiny-ultramem": 5e-3}
CASES = {  # preset -> placement for 2 blocks
    "tiny-ultramem": "1:1/2:2",
    "tiny-ultramem-v2": "full",
    "tiny-pkm": "2:2",
    "tiny-memory-plus": "1:1/2:2",
}


@pytest.mark.parametrize("preset", sorted(CASES))
def test_golden_loss_memory_models(preset, slice_data, tmp_path):
    over = tiny_overrides(slice_data) + [f"model.memory.placement={CASES[preset]}"]
    cfg = load_config(preset, overrides=over)
    assert cfg.model.memory.type == preset.removeprefix("tiny-").replace("-", "_")
    train(cfg, tmp_path / "run", progress=False)
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and losses[-1] < losses[0] - 1.0
    path = GOLDEN / f"{preset}_loss_30.json"
    if os.environ.get("UPDATE_GOLDEN"):
        what = f"tests/train/test_golden_memory.py: {preset} with tiny_overrides on the slice, 30 steps, CPU fp32"
        path.write_text(json.dumps({"what": what, "losses": losses}, indent=1) + "\n")
    golden = json.loads(path.read_text())["losses"]
    assert losses == pytest.approx(golden, rel=REL_TOL.get(preset, 2e-3), abs=2e-3)
