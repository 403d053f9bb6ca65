"""``dude train --report-to``: one real run logs to TensorBoard, W&B (offline), MLflow (local
file store) and trackio (local store) at once, and each tracker's own reader gives back the
points of metrics.jsonl, the eval results and the resolved config. A resume purges the steps
run again from TensorBoard; a tracker that is not installed, or W&B without a login, stops
the start in one line and leaves no run; ``dude compare`` names each run."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_train import make_math_file, make_tiny_model_dir, tiny_train_args

from dude.train.trackers import flatten

STEPS = 4
EVAL = ["--tasks", "heldout", "--eval-limit", "4", "--max-new-tokens", "8"]


def _env(root: Path, **extra: str) -> dict[str, str]:
    """Every tracker offline and under ``root``; nothing read from this machine's logins."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_", "TENSORBOARD_"))}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(root),
            "WANDB_CONFIG_DIR": str(root / "wandb-config"), "WANDB_CACHE_DIR": str(root / "wandb-cache"),
            "WANDB_DATA_DIR": str(root / "wandb-data"), "TRACKIO_DIR": str(root / "trackio"),
            "MLFLOW_TRACKING_URI": f"file:{root / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true", **extra}


def _dude(args: list[str], env: dict[str, str], prelude: str = "pass") -> subprocess.CompletedProcess:
    code = f"import sys; {prelude}; from dude.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir) -> Path:
    root = tmp_path_factory.mktemp("tiny_trackers")
    make_tiny_model_dir(root / "model", smollm2_dir)
    make_math_file(root / "math.jsonl")
    return root


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory) -> Path:
    """4 steps with a checkpoint at step 2, then eval on 4 held-out rows, reported to all four."""
    root = tmp_path_factory.mktemp("trackers")
    proc = _dude(tiny_train_args(tiny, root / "run", STEPS, "--save-every", "2", *EVAL, "--report-to", "tensorboard",
                                 "wandb", "mlflow", "trackio", "--run-name", "tiny/dude"), _env(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def _expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tracker key: metrics.jsonl's fields, then eval.json's numbers at the last step."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    points = {f"train/{k}": [(r["step"], r[k]) for r in lines] for k in lines[0] if k != "step"}
    for name, result in json.loads((run / "eval.json").read_text()).items():
        points.update({f"eval/{name}/{k}": [(STEPS, v)] for k, v in result.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
    assert [s for s, _ in points["train/loss"]] == list(range(1, STEPS + 1)) and "eval/heldout/accuracy" in points
    return points


def _config(run: Path) -> dict[str, object]:
    return flatten(yaml.safe_load((run / "config.yaml").read_text()))


def _tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return events


def test_tensorboard_shows_the_loss_curve_and_the_config(run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = run / "run"
    events = _tensorboard(out / "tensorboard")
    expected = _expected(out)
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, points in expected.items():  # TensorBoard keeps scalars in float32
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(s, float(np.float32(v))) for s, v in points], key
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    logged = {k: v.number_value if v.HasField("number_value") else v.string_value for k, v in start.hparams.items()}
    assert logged == {k: float(v) if isinstance(v, (int, float)) else str(v) for k, v in _config(out).items()}


def _wandb_records(path: Path):
    """The records of a ``.wandb`` file, read with wandb's own protobuf classes. The framing is
    LevelDB's log format (what wandb's former ``sdk/internal/datastore.py`` read): a 7-byte
    header ':W&B', 0xBEE1, 0; then 32 KiB blocks of chunks (crc32 seeded with the chunk type,
    length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    pos, record = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"corrupt chunk at byte {pos}"
        pos, record = pos + 7 + length, record + chunk
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(record)
            record = b""


def test_wandb_offline_run_holds_the_points_and_the_config(run):
    (path,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(_wandb_records(path))
    (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert started.display_name == "tiny/dude" and started.project == "dude"
    config = {u.key: json.loads(u.value_json) for u in started.config.update if u.key != "_wandb"}
    assert config == _config(run / "run")
    logged: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)  # wandb-core files keys with '/' as nested_key
                if not key.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                    logged.setdefault(key, []).append((r.history.step.num, json.loads(item.value_json)))
    assert logged == _expected(run / "run")


def test_mlflow_local_store_holds_the_points_and_the_config(run, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3.x keeps the file store behind this switch
    client = MlflowClient(tracking_uri=f"file:{run / 'mlruns'}")
    experiment = client.get_experiment_by_name("dude")
    (found,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'tiny/dude'")
    assert found.info.status == "FINISHED"
    assert found.data.params == {k: str(v) for k, v in _config(run / "run").items()}
    expected = _expected(run / "run")
    assert set(found.data.metrics) == set(expected)
    for key, points in expected.items():
        assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, key)] == points, key


def test_trackio_local_store_holds_the_points_and_the_config(run):
    code = """import json, sys
from trackio.sqlite_storage import SQLiteStorage as S
print(json.dumps([S.get_runs("dude"), S.get_logs("dude", "tiny/dude"), S.get_run_config("dude", "tiny/dude")]))"""
    # trackio reads TRACKIO_DIR when imported: its reader runs in a process of its own
    proc = subprocess.run([sys.executable, "-c", code], env=_env(run), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    runs, logs, config = json.loads(proc.stdout.splitlines()[-1])
    assert runs == ["tiny/dude"]
    assert {k: v for k, v in config.items() if not k.startswith("_")} == _config(run / "run")
    logged: dict[str, list[tuple[int, float]]] = {}
    for row in logs:
        for key, value in row.items():
            if key not in ("step", "timestamp"):
                logged.setdefault(key, []).append((row["step"], value))
    assert logged == _expected(run / "run")


def test_resume_purges_the_steps_run_again_from_tensorboard(run, tiny, tmp_path):
    """Cut the run back to its step-2 checkpoint, its TensorBoard events kept (steps 1-4),
    and resume: steps 3 and 4 are logged again, and TensorBoard shows each step once."""
    cut = tmp_path / "cut"
    shutil.copytree(run / "run", cut)
    for name in ("adapter_model.safetensors", "adapter_config.json", "summary.json", "eval.json"):
        (cut / name).unlink()
    proc = _dude(tiny_train_args(tiny, cut, STEPS, "--save-every", "2", *EVAL, "--resume", "--report-to",
                                 "tensorboard"), _env(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list((cut / "tensorboard").iterdir())) == 2  # the first try's events and the resumed run's
    events = _tensorboard(cut / "tensorboard")
    lines = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, e.value) for e in events.Scalars("train/lr")] == [(r["step"], float(np.float32(r["lr"])))
                                                                       for r in lines]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_tracker_not_installed_is_named_with_its_pip_extra(command, tiny, tmp_path):
    args = tiny_train_args(tiny, tmp_path / "run", 2, "--report-to", "tensorboard", "wandb")
    if command == "compare":
        args = ["compare", *args[1:args.index("--method")], *args[args.index("--method") + 2:]]
    proc = _dude(args, _env(tmp_path), prelude="sys.modules['wandb'] = None")  # as if not installed
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [f"dude {command}: error: run.report_to: wandb is not installed; pip install 'dude[wandb]'  "
                      "(DUDE_DEBUG=1 shows the traceback)"], proc.stderr
    assert not (tmp_path / "run").exists()  # refused before any folder or model


def test_wandb_without_a_login_stops_in_one_line_and_leaves_no_run(tiny, tmp_path):
    env = _env(tmp_path)
    del env["WANDB_MODE"]  # online, and no API key in this clean config folder
    proc = _dude(tiny_train_args(tiny, tmp_path / "run", 2, "--report-to", "tensorboard", "wandb"),
                 {**env, "HOME": str(tmp_path)})  # (no ~/.netrc either)
    assert proc.returncode == 2
    (error,) = [line for line in proc.stderr.splitlines() if "dude train: error" in line]
    assert "run.report_to: wandb did not start" in error and "WANDB_MODE=offline" in error, proc.stderr
    assert not (tmp_path / "run").exists()


def test_compare_gives_each_run_its_own_name(monkeypatch, tmp_path):
    from dude.compare import CompareConfig
    from dude.compare import runner
    from dude.train.options import build

    class Sent(Exception):
        """The config of the train process that would start (none starts)."""

    def capture(command, config, path):
        raise Sent(config)

    monkeypatch.setattr(runner, "_subprocess", capture)
    sent = []
    for run_name, prefix in ((None, "cmp"), ("sweep", "sweep")):
        cfg = build(CompareConfig, {"run": {"output_dir": str(tmp_path / "cmp"), "report_to": ["tensorboard"],
                                            "run_name": run_name}})
        for seed in (0, 1):
            for method in ("lora", "dude"):
                with pytest.raises(Sent) as caught:
                    runner._train_one(cfg, tmp_path / "cmp", method, seed)
                sent.append(caught.value.args[0])
    names = [c.run.run_name for c in sent]
    assert names == [f"{p}/{m}-seed{s}" for p in ("cmp", "sweep") for s in (0, 1) for m in ("lora", "dude")]
    assert all(c.run.report_to == ["tensorboard"] for c in sent)
