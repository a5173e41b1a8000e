"""Every bad input of issue 17, table-driven through the command line: exit status 2, one
line ``ultramem <command>: error: ...`` on stderr, no traceback, and the message names the
problem (the field, file or argument, and the value)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ultramem.cli import main

TINY = {"model.vocab_size": 8192, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2,
        "model.max_seq_len": 64, "model.ffn.hidden": 128, "data.seq_len": 32, "train.batch_size": 4,
        "train.max_steps": 2, "train.eval_every": 0, "train.eval_batches": 2, "train.ckpt_every": 0,
        "train.device": "cpu"}


def tiny(data: Path, **extra) -> list[str]:
    return [f"{k}={v}" for k, v in {**TINY, "data.path": str(data), **extra}.items()]


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def files(tmp_path_factory, slice_data) -> dict[str, Path]:
    """A trained 2-step run and a set of bad files, shared by the table."""
    root = tmp_path_factory.mktemp("bad")
    f = {"root": root, "data": slice_data}
    (root / "adir").mkdir()
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 100)
    (root / "latin1.jsonl").write_bytes(json.dumps({"text": "x"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "notparquet.parquet").write_bytes(b"this is not parquet at all")
    (root / "afile").write_text("x")
    (root / "empty.json").write_text("")
    (root / "malformed.json").write_text("{\"train\": {\"lr\": 1e-3,,}")
    (root / "list.json").write_text("[1, 2]")
    (root / "shape.json").write_text(json.dumps({"model": 3}))
    (root / "small.txt").write_text("just a few words")
    np.arange(100, dtype=np.uint16).tofile(root / "tok.npy")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [1, 2, 3]}), root / "ints.parquet")
    except ImportError:
        pass
    run = root / "run"
    assert main(["train", "--out", str(run), "--no-progress", *tiny(slice_data)]) == 0
    f["run"] = run
    (root / "norun").mkdir()
    return f


# (id, argv with {placeholders}, text the message must contain)
CASES = [
    # data prepare
    ("input-dir", "data prepare --out {root}/o1 --input {root}/adir", "adir: is a directory"),
    ("input-missing", "data prepare --out {root}/o1 --input {root}/nope.txt", "nope.txt: no such file"),
    ("input-latin1", "data prepare --out {root}/o1 --input {root}/latin1.txt", "latin1.txt: not valid utf-8"),
    ("jsonl-latin1", "data prepare --out {root}/o1 --input {root}/latin1.jsonl", "latin1.jsonl: not valid utf-8"),
    ("input-binary", "data prepare --out {root}/o1 --input {root}/binary.txt", "binary.txt: looks like a binary"),
    ("not-parquet", "data prepare --out {root}/o1 --input {root}/notparquet.parquet", "not a readable parquet"),
    ("parquet-int-column", "data prepare --out {root}/o1 --input {root}/ints.parquet", "not string"),
    ("encoding-unknown", "data prepare --out {root}/o1 --input {root}/latin1.txt --encoding nope",
     "--encoding='nope': unknown encoding"),
    ("prepare-out-file", "data prepare --out {root}/afile --input {root}/small.txt", "afile: exists and is not a directory"),
    ("val-fraction", "data prepare --out {root}/o1 --input {root}/small.txt --val-fraction 1.5", "--val-fraction=1.5"),
    ("npy-vocab-0", "data prepare --out {root}/o1 --npy {root}/tok.npy --vocab-size 0", "--vocab-size=0"),
    ("npy-vocab-small", "data prepare --out {root}/o1 --npy {root}/tok.npy --vocab-size 10", "token id 99"),
    ("npy-dtype", "data prepare --out {root}/o1 --npy {root}/tok.npy --npy-dtype int8", "--npy-dtype='int8'"),
    ("tokenizer-vocab", "data tokenizer --out {root}/t.json --vocab-size 0", "argument --vocab-size: 0 is out of range"),
    # train: config values
    ("lr-negative", "train --out {root}/t1 {tiny} train.lr=-1", "train.lr=-1.0"),
    ("log-every-0", "train --out {root}/t1 {tiny} train.log_every=0", "train.log_every=0"),
    ("eval-batches-0", "train --out {root}/t1 {tiny} train.eval_batches=0", "train.eval_batches=0"),
    ("grad-clip-negative", "train --out {root}/t1 {tiny} train.grad_clip=-1", "train.grad_clip=-1.0"),
    ("keep-last-negative", "train --out {root}/t1 {tiny} train.keep_last=-1", "train.keep_last=-1"),
    ("spike-negative", "train --out {root}/t1 {tiny} train.spike_factor=-2", "train.spike_factor=-2.0"),
    ("deterministic-bad", "train --out {root}/t1 {tiny} train.deterministic=maybe", "train.deterministic='maybe'"),
    ("seq-len-0", "train --out {root}/t1 {tiny} data.seq_len=0", "data.seq_len=0"),
    ("lr-not-number", "train --out {root}/t1 {tiny} train.lr=fast", "train.lr='fast' must be a number"),
    ("unknown-field", "train --out {root}/t1 {tiny} train.lrr=1", "did you mean 'train.lr'"),
    ("value-dim-negative", "info --preset tiny-ultramem model.memory.value_dim=-4", "model.memory.value_dim=-4"),
    ("seq-over-context", "train --out {root}/t1 {tiny} data.seq_len=128", "data.seq_len=128 exceeds model.max_seq_len=64"),
    ("stop-after-0", "train --out {root}/t1 {tiny} --stop-after 0", "argument --stop-after: 0 is out of range"),
    # train: --config files
    ("config-missing", "train --out {root}/t1 --config {root}/none.json", "none.json: no such file"),
    ("config-empty", "train --out {root}/t1 --config {root}/empty.json", "empty.json: the file is empty"),
    ("config-malformed", "train --out {root}/t1 --config {root}/malformed.json", "malformed.json: not valid JSON"),
    ("config-dir", "train --out {root}/t1 --config {root}/adir", "adir: is a directory"),
    ("config-list", "train --out {root}/t1 --config {root}/list.json", "list.json: expected a JSON object"),
    ("config-shape", "train --out {root}/t1 --config {root}/shape.json", "model must be a JSON object"),
    # train: locations and runs
    ("out-is-file", "train --out {root}/afile {tiny}", "afile: exists and is not a directory"),
    ("data-missing", "train --out {root}/t1 {tiny} data.path={root}/nodata", "nodata: not a prepared dataset"),
    ("vocab-mismatch", "train --out {root}/t1 {tiny} model.vocab_size=100", "vocabulary mismatch"),
    ("force-changed-d-model", "train --out {run} --force {tiny} model.d_model=32 model.n_heads=2",
     "weight shapes do not fit"),
    ("changed-config", "train --out {run} {tiny} train.lr=0.5", "train.lr: 0.0006 -> 0.5"),
    # eval
    ("eval-max-batches-0", "eval {run} --max-batches 0", "argument --max-batches: 0 is out of range"),
    ("eval-batch-size-0", "eval {run} --batch-size 0", "argument --batch-size: 0 is out of range"),
    ("eval-no-checkpoint", "eval {root}/norun", "norun: no checkpoint"),
    ("eval-data-missing", "eval {run} --data {root}/nothing", "nothing: neither a file nor a prepared dataset"),
    ("eval-small-file", "eval {run} --data {root}/small.txt", "small.txt"),
    ("eval-latin1", "eval {run} --data {root}/latin1.txt", "latin1.txt: not valid utf-8"),
    # generate
    ("max-new-context", "generate {run} --max-new 64", "--max-new=64: must be < the model's context"),
    ("max-new-negative", "generate {run} --max-new -1", "--max-new=-1"),
    ("temperature-negative", "generate {run} --max-new 5 --temperature -1", "--temperature=-1.0"),
    ("top-k-negative", "generate {run} --max-new 5 --top-k -1", "--top-k=-1"),
    ("generate-no-run", "generate {root}/norun", "norun: no checkpoint"),
    # other commands
    ("plot-not-a-run", "plot {root}/norun --out {root}/p.png", "no metrics"),
    ("info-bad-preset", "info --preset dense-151", "did you mean"),
    ("unknown-option", "eval {run} --nope", "unrecognized arguments: --nope"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(case, files, capsys):
    name, argv, expected = case
    if name == "parquet-int-column" and not (files["root"] / "ints.parquet").exists():
        pytest.skip("pyarrow is not installed")
    tiny_args = " ".join(tiny(files["data"]))
    parts = argv.split(" ")
    argv_list: list[str] = []
    for p in parts:
        if p == "{tiny}":
            argv_list += tiny_args.split(" ")
        else:
            argv_list.append(p.format(root=files["root"], run=files["run"]))
    rc, _, err = cli(argv_list, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    command = "ultramem " + " ".join(argv_list[:2] if argv_list[0] == "data" else argv_list[:1])
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{command}: error: "), lines[0]
    assert expected in lines[0], lines[0]


def test_eval_small_file_names_the_file_not_a_temporary_directory(files, capsys):
    rc, _, err = cli(["eval", files["run"], "--data", files["root"] / "small.txt"], capsys)
    assert rc == 2 and "/tmp" not in err.replace(str(files["root"]), "") and "fewer than seq_len+1" in err


def test_override_after_an_option_is_accepted(files, capsys):
    run = files["root"] / "after"
    over = tiny(files["data"])
    rc, out, err = cli(["train", *over[:3], "--out", run, *over[3:], "--no-progress", "train.max_steps=1"], capsys)
    assert rc == 0, err
    assert json.loads(out)["step"] == 1


def test_memory_type_on_a_preset_without_memory(capsys):
    """The hint no longer points back to itself: model.memory.type=... creates the layer."""
    rc, out, err = cli(["info", "--preset", "tiny-dense", "model.memory.type=pkm", "model.memory.placement=2:2",
                        "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["params"] > 0


def test_debug_shows_the_traceback(files):
    from ultramem.errors import ConfigError

    with pytest.raises(ConfigError, match="train.lr"):
        main(["train", "--out", str(files["root"] / "t2"), "--debug", *tiny(files["data"]), "train.lr=-1"])


def test_eval_json_is_valid(files, capsys):
    rc, out, _ = cli(["eval", files["run"], "--json", "--max-batches", "1"], capsys)
    assert rc == 0 and json.loads(out)["loss"] > 0
