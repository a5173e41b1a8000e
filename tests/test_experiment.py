"""``ultramem experiment``: runs in order, results written as it goes, resumable, sizes checked."""

import json

import pytest

from ultramem.errors import ConfigError
from ultramem.experiment import check_equal, find_experiment, load_experiment, run_configs, run_experiment

COMMON = ["train.max_steps=3", "train.batch_size=2", "data.seq_len=32", "train.eval_every=0",
          "train.eval_batches=2", "train.device=cpu", "train.ckpt_every=0"]


def _spec(tmp_path, runs, **extra):
    p = tmp_path / "exp.json"
    p.write_text(json.dumps({"description": "test", "common": COMMON, "runs": runs, **extra}))
    return p


def test_runs_write_results_and_a_rerun_skips_finished_runs(tmp_path, slice_data):
    spec = _spec(tmp_path, [{"name": "d", "preset": "tiny-dense"}, {"name": "u", "preset": "tiny-ultramem"}])
    out = tmp_path / "out"
    res = run_experiment(str(spec), out, [f"data.path={slice_data}"], progress=False)
    on_disk = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in on_disk["runs"]] == ["done", "done"] == [r["status"] for r in res["runs"]]
    for r in on_disk["runs"]:
        assert r["val_loss"] > 0 and r["tokens"] == 3 * 2 * 32 and r["params"] > 0 and 3 in {int(k) for k in r["val_curve"]}
    stamp = (out / "runs" / "u" / "summary.json").stat().st_mtime_ns
    again = run_experiment(str(spec), out, [f"data.path={slice_data}"], progress=False)
    assert (out / "runs" / "u" / "summary.json").stat().st_mtime_ns == stamp  # not retrained
    assert [r["val_loss"] for r in again["runs"]] == [r["val_loss"] for r in on_disk["runs"]]


def test_a_failing_run_is_recorded_and_the_next_one_runs(tmp_path, slice_data):
    spec = _spec(tmp_path, [{"name": "bad", "preset": "tiny-dense", "overrides": [f"data.path={tmp_path}/missing"]},
                            {"name": "good", "preset": "tiny-dense", "overrides": [f"data.path={slice_data}"]}])
    res = run_experiment(str(spec), tmp_path / "out", progress=False)
    status = {r["name"]: r["status"] for r in res["runs"]}
    assert status["bad"].startswith("failed: DataError") and status["good"] == "done"


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, slice_data):
    from ultramem.train.trainer import train

    spec = _spec(tmp_path, [{"name": "d", "preset": "tiny-dense"}])
    (_, cfg), = run_configs(load_experiment(spec), [f"data.path={slice_data}"])
    out = tmp_path / "out"
    train(cfg, out / "runs" / "d", stop_after=2, progress=False)  # as if interrupted after step 2
    res = run_experiment(str(spec), out, [f"data.path={slice_data}"], progress=False)
    rows = [json.loads(line) for line in (out / "runs" / "d" / "metrics.jsonl").read_text().splitlines()]
    assert res["runs"][0]["status"] == "done" and [r["step"] for r in rows] == [1, 2, 3]


def test_equal_sizes_are_checked_before_training(tmp_path):
    spec = _spec(tmp_path, [{"name": "d", "preset": "tiny-dense"}, {"name": "u", "preset": "tiny-ultramem"}],
                 equal={"params": 0.02})
    with pytest.raises(ConfigError, match="differ in params"):
        run_experiment(str(spec), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "runs").exists()


def test_unknown_experiment_and_bad_specs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="known: .*diagnosis"):
        find_experiment("no-such-experiment")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"runs": [{"name": "a"}, {"name": "a"}]}))
    with pytest.raises(ConfigError, match="unique"):
        load_experiment(bad)
    with pytest.raises(ConfigError, match="run 'x'"):
        run_configs({"runs": [{"name": "x", "preset": "tiny-dense", "overrides": ["train.lrr=1"]}]}, [])


def test_committed_experiments_resolve_and_families_are_equal_size():
    for name in ("diagnosis", "diagnosis-warmup", "v1-family", "v2-family", "ablation-ladder"):
        spec = load_experiment(find_experiment(name))
        runs = run_configs(spec, [])
        assert len(runs) == len(spec["runs"])
        sizes = check_equal(spec, runs)  # raises when a family drifts beyond its 2 %
        if name.endswith("family"):
            compared = {r["name"] for r in spec["runs"] if r.get("reference", True)}  # dense rows are exempt
            assert "equal" in spec and len(compared) >= 3
            assert len({round(sizes[n]["params"], -7) for n in compared}) == 1, name
    v1 = check_equal(spec := load_experiment(find_experiment("v1-family")), run_configs(spec, []))
    assert abs(v1["dense-flops"]["flops_per_token"] / v1["ultramem"]["flops_per_token"] - 1) < 0.02  # equal-FLOPs dense


def test_parallel_jobs_with_after_run_probes(tmp_path, slice_data):
    """--jobs: each run in its own worker process; results.json gets the after-run figures."""
    spec = _spec(tmp_path, [{"name": "a", "preset": "tiny-dense"}, {"name": "b", "preset": "tiny-dense",
                                                                   "overrides": ["train.seed=1"]}],
                 after={"english": True, "english_batches": 1, "probes": {"people": 3, "n": 2, "seed": 0},
                        "keep_checkpoints": False})
    out = tmp_path / "out"
    res = run_experiment(str(spec), out, [f"data.path={slice_data}", "train.checkpoint=true"], jobs=2)
    on_disk = json.loads((out / "results.json").read_text())
    for r in (res["runs"], on_disk["runs"]):
        assert [x["status"] for x in r] == ["done", "done"]
    for r in on_disk["runs"]:
        assert r["val_loss_english"] > 0 and r["probes"]["knowledge_recall"]["n"] == 3 * 4
        assert r["probes"]["icl"]["n"] == 2 and 0 <= r["probes"]["kv_retrieval"]["acc"] <= 1
        assert (out / "runs" / f"{r['name']}.log").is_file()
        assert not (out / "runs" / r["name"] / "checkpoints").exists()  # keep_checkpoints: false
    assert on_disk["runs"][0]["val_loss"] != on_disk["runs"][1]["val_loss"]  # two seeds, two runs


def test_after_run_full_validation_scores_every_val_token(tmp_path, slice_data):
    """val_full: the whole val split, token by token; its mean is the loss of the sequential
    evaluation over the same windows, and the per-document / per-position figures add up."""
    import numpy as np
    import torch

    from ultramem.data.loader import TokenBatches
    from ultramem.eval.loss import evaluate_loss
    from ultramem.inference.load import load_run

    spec = _spec(tmp_path, [{"name": "u", "preset": "tiny-ultramem"}],
                 after={"val_full": True, "keep_checkpoints": True})
    out = tmp_path / "out"
    res = run_experiment(str(spec), out, [f"data.path={slice_data}", "train.checkpoint=true", "train.batch_size=64"],
                         progress=False)  # batches of 64 windows: the whole val split in ~90 forwards
    row = res["runs"][0]
    losses = np.load(out / "runs" / "u" / "val_token_losses.npy")
    assert losses.size == row["val_tokens_full"] and losses.size % 32 == 0  # whole windows of seq_len 32
    assert sum(row["val_tokens_by_document"]) == losses.size and len(row["val_loss_by_document"]) > 1
    assert abs(float(losses.astype(np.float64).mean()) - row["val_loss_full"]) < 1e-2  # float16 storage
    assert list(row["val_loss_by_position"]) == ["0-0", "1-1", "2-3", "4-7", "8-15", "16-31"]
    loaded = load_run(out / "runs" / "u", torch.device("cpu"))
    batches = TokenBatches(slice_data, "val", 32, 64, shuffle=False)
    n_full = len(batches) // 64 * 64 * 32  # evaluate_loss scores whole batches only
    ref, n = evaluate_loss(loaded.model, batches, torch.device("cpu"), "fp32")
    assert n == n_full and abs(ref - float(losses[:n].astype(np.float64).mean())) < 1e-2
