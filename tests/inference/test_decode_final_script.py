"""The decode sweep script (``benchmarks/decode_final.py``) end to end on the CPU (``--cpu-dry-run``:
tiny presets, CPU timers): it writes the JSON the docs cite, with the row fields of the
benchmark, one family's rows, our generate rows and HF's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_decode_final_dry_run(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode_final.py"), "--cpu-dry-run", "--out", str(tmp_path),
           "--budget-s", "120", "--family", "227m-1.2b", "--tag", "t"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads((tmp_path / "decode-dry-t.json").read_text())
    assert doc["device"] == "cpu (dry run)" and "decode_final.py" in doc["command"]
    rows = doc["rows"]
    assert {r["family"] for r in rows} == {"227m-1.2b"} and {r["batch"] for r in rows} == {1, 4}
    for r in rows:
        assert {"model", "family", "batch", "kv", "ms", "tokens_per_s", "bytes", "GBps"} <= r.keys()
        assert r["ms"] > 0 and r["bytes"] > 0 and r["attention"] == "auto"
    assert any(g["engine"] == "ultramem eager" and g["tokens_per_s"] > 0 for g in doc["generate"])
    assert doc["hf"] and doc["hf"][0]["model"].startswith("llama")
