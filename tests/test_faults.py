"""Faults injected for real: SIGTERM / SIGUSR1 sent to a real ``dude train`` (one process,
and 2 under torchrun), bytes truncated or flipped in real checkpoints, a full disk (a real
48 MB tmpfs, and a patched writer), a second run into a busy folder. Each asserts the exit
code, the message, which checkpoint the resume used, and that the final adapter equals
the uninterrupted run's."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import _adapter, _cfg, _examples, _Tok, make_math_file, make_tiny_model_dir, tiny_train_args
from tiny_models import tiny_llama

from dude.cli import main
from dude.safe_write import EXIT_IO, WriteFailed
from dude.train import checkpoint, manifest, train
from dude.train.checkpoint import list_checkpoints
from dude.train.preempt import Watch
from dude.train.runlock import NAME as LOCK, FolderBusy, FolderLock

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dude.cli"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir) -> Path:
    root = tmp_path_factory.mktemp("tiny_faults")
    make_tiny_model_dir(root / "model", smollm2_dir)
    make_math_file(root / "math.jsonl")
    return root


def _start(args: list[str], prefix: list[str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([*(prefix or [sys.executable, "-m", "dude.cli"]), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return out


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int) -> None:
    """Until metrics.jsonl shows ``step`` (the run is inside its training loop)."""
    deadline = time.monotonic() + 240
    while True:
        lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        if len(lines) >= step:
            return
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the run never reached its step"
        time.sleep(0.02)


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ preemption, one process

STEPS = 24


@pytest.fixture(scope="module")
def full(tiny, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must equal (dropout 0.1: RNG restored too)."""
    out = tmp_path_factory.mktemp("full") / "run"
    proc = _start(tiny_train_args(tiny, out, STEPS))
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    return out


@pytest.mark.parametrize("sig, burst", [(signal.SIGTERM, 1), (signal.SIGUSR1, 30)])
def test_a_signal_saves_the_step_and_resume_is_bit_identical(sig, burst, tiny, full, tmp_path, capsys):
    """No periodic checkpoint is due (save_every 0): the signal makes the run finish its step,
    save it and exit 128+signum. A burst of 30 signals (some land while saving) changes
    nothing. A second run into the folder meanwhile is refused, naming the first."""
    run = tmp_path / "run"
    victim = _start(tiny_train_args(tiny, run, STEPS))
    _wait_for_step(victim, run, 3)
    holder = json.loads((run / LOCK).read_text())
    assert holder["pid"] == victim.pid and holder["command"] == "dude train"
    assert main(tiny_train_args(tiny, run, STEPS, "--resume")) == 2  # in this process: refused before loading
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the resolved config
    assert err.startswith(f"dude train: error: run.output_dir {str(run)!r} is in use by dude train (pid {victim.pid} on ")
    for _ in range(burst):
        victim.send_signal(sig)
        time.sleep(0.005)
    out = _wait(victim)
    assert victim.returncode == 128 + sig, out
    stopped = _steps(run)[-1]
    assert stopped < STEPS
    assert [s for s, _ in list_checkpoints(run)] == [stopped]  # the step in progress, saved
    assert manifest.check(list_checkpoints(run)[0][1]) is None
    assert f"stopped by {signal.Signals(sig).name} after step {stopped} of {STEPS}" in out
    assert not (run / LOCK).exists() and not (run / "adapter_model.safetensors").exists()
    resumed = _start(tiny_train_args(tiny, run, STEPS, "--resume"))
    out = _wait(resumed)
    assert resumed.returncode == 0, out
    assert f"continuing from {run / 'checkpoints' / f'step-{stopped:06d}.pt'}" in out
    assert _same(_adapter(full), _adapter(run))
    assert _steps(run) == list(range(1, STEPS + 1))


def test_signal_watch_keeps_the_first_signal_and_restores_handlers_unless_stopping():
    before = signal.getsignal(signal.SIGTERM)
    with Watch():
        pass
    assert signal.getsignal(signal.SIGTERM) is before
    try:
        with Watch() as watch:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal: recorded, not acted on
            time.sleep(0.01)
        assert (watch.received, watch.count) == (signal.SIGUSR1, 2)
        os.kill(os.getpid(), signal.SIGTERM)  # stopping: a late signal cannot kill the process before its exit
        time.sleep(0.01)
        assert watch.count == 3
    finally:
        signal.signal(signal.SIGTERM, before)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


# ------------------------------------------------------------------ preemption under torchrun


def _worker(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (from /proc: its RANK variable)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank}")


def test_sigusr1_to_one_torchrun_rank_saves_the_same_step_on_both(tiny, tmp_path):
    """FSDP on 2 processes: SIGUSR1 to rank 1 alone; the ranks agree at the step boundary,
    both write their shards of the same step and exit 138. The newest checkpoint is then
    damaged (a flipped byte in a shard): --resume sets it aside and continues from the one
    before, to the uninterrupted run's bits."""
    steps, fsdp = 12, ["--grad-accum", "1", "--strategy", "fsdp", "--keep-checkpoints", "0"]
    full = _start(tiny_train_args(tiny, tmp_path / "full", steps, *fsdp), TORCHRUN)
    assert _wait(full) and full.returncode == 0
    run = tmp_path / "run"
    victim = _start(tiny_train_args(tiny, run, steps, *fsdp, "--save-every", "2"), TORCHRUN)
    _wait_for_step(victim, run, 3)
    os.kill(_worker(victim, 1), signal.SIGUSR1)
    out = _wait(victim)
    assert victim.returncode != 0 and "exitcode  : 138" in out, out
    stopped = _steps(run)[-1]
    assert stopped < steps and f"stopped by SIGUSR1 after step {stopped} of {steps}" in out
    newest = list_checkpoints(run)[-1][1]
    assert newest.name == f"step-{stopped:06d}" and manifest.check(newest) is None
    assert {p.name for p in newest.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}  # both ranks' shards
    shard = newest / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = list_checkpoints(run)[-2]
    resumed = _start(tiny_train_args(tiny, run, steps, *fsdp, "--save-every", "2", "--resume"), TORCHRUN)
    out = _wait(resumed)
    assert resumed.returncode == 0, out
    assert f"{newest}' is damaged (__1_0.distcp does not match its sha256 checksum)" in out
    assert f"continuing from {before[1]} (step {before[0]} of {steps})" in out
    assert (run / "checkpoints" / f"damaged-{newest.name}").is_dir()
    assert _same(_adapter(tmp_path / "full"), _adapter(run))


# ------------------------------------------------------------------ damaged checkpoints


def _cut(full: Path, to: Path) -> Path:
    """A copy of a finished run with its final files removed: what a killed run leaves."""
    shutil.copytree(full, to)
    for name in ("adapter_model.safetensors", "adapter_config.json", "summary.json", "loss.png"):
        (to / name).unlink()
    return to


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_resumes(damage, tmp_path, capsys):
    full = tmp_path / "full"
    train(_cfg(full, save_every=2, keep_checkpoints=0), tiny_llama(), _Tok(), _examples())
    run = _cut(full, tmp_path / "run")
    path = run / "checkpoints" / "step-000004.pt"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    train(_cfg(run, save_every=2, keep_checkpoints=0, resume=True), tiny_llama(), _Tok(), _examples())
    captured = capsys.readouterr()
    why = "does not match its sha256 checksum" if damage == "flip" else f"has {len(data) // 2} bytes, its manifest says"
    assert f"checkpoint {str(path)!r} is damaged (step-000004.pt {why}" in captured.err
    assert "set aside as 'damaged-step-000004.pt'" in captured.err
    assert f"continuing from {run / 'checkpoints' / 'step-000002.pt'}" in captured.out
    assert (run / "checkpoints" / "damaged-step-000004.pt").read_bytes() != data  # kept for the user
    assert _same(_adapter(full), _adapter(run))


def test_a_torn_metrics_line_and_temp_leftovers_of_a_killed_run_do_not_stop_resume(tmp_path, capsys):
    """What a SIGKILL while writing leaves: a half-written last line of metrics.jsonl, a
    checkpoint's temp file and a sharded checkpoint's staging folder. The resume drops the
    line (with a warning), deletes the leftovers and ends where the uninterrupted run did."""
    run, full = _cut_metrics(tmp_path), tmp_path / "full"
    for step, path in list_checkpoints(run):
        if step > 4:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            Path(f"{path}.manifest.json").unlink(missing_ok=True)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    leftovers = [run / "checkpoints" / ".tmp-step-000006.pt.99999", run / "checkpoints" / ".tmp-step-000006",
                 run / ".tmp-loss.99999.png"]
    leftovers[0].write_bytes(b"partial")
    leftovers[1].mkdir()
    (leftovers[1] / "__0_0.distcp").write_bytes(b"partial")
    leftovers[2].write_bytes(b"partial")
    capsys.readouterr()
    train(_cfg(run, save_every=2, keep_checkpoints=0, resume=True), tiny_llama(), _Tok(), _examples())
    captured = capsys.readouterr()
    assert f"warning: the last line of {str(run / 'metrics.jsonl')!r} was cut short while being written" in captured.err
    assert f"continuing from {run / 'checkpoints' / 'step-000004.pt'}" in captured.out
    assert not any(p.exists() for p in leftovers)
    assert _same(_adapter(full), _adapter(run))
    assert _steps(run) == list(range(1, 7))


def test_damage_inside_metrics_is_named_not_skipped(tmp_path):
    run = _cut_metrics(tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:2]) + "{not json\n" + "".join(lines[3:]))
    with pytest.raises(ValueError, match=r"metrics.jsonl' line 3 is not JSON .*; repair or delete that line"):
        train(_cfg(run, save_every=2, keep_checkpoints=0, resume=True), tiny_llama(), _Tok(), _examples())


def _cut_metrics(tmp_path: Path) -> Path:
    full = tmp_path / "full"
    train(_cfg(full, save_every=2, keep_checkpoints=0), tiny_llama(), _Tok(), _examples())
    return _cut(full, tmp_path / "run")


def test_no_whole_checkpoint_refuses_and_never_starts_over(tmp_path, tiny, capsys):
    run = tmp_path / "run"
    assert main(tiny_train_args(tiny, run, 4, "--save-every", "2", "--keep-checkpoints", "0")) == 0
    (run / "adapter_model.safetensors").unlink()
    for _, path in list_checkpoints(run):
        path.write_bytes(path.read_bytes()[:-10])
    capsys.readouterr()
    for _ in range(2):  # the second time, only the set-aside ones are left: still refused
        assert main(tiny_train_args(tiny, run, 4, "--save-every", "2", "--resume")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "no checkpoint in" in err[-1] and "is whole (damaged, set aside: damaged-step-000002.pt" in err[-1]
    assert not (run / "adapter_model.safetensors").exists() and _steps(run)[-1] == 4


def test_retention_keeps_a_verified_checkpoint_with_keep_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    state = {"w": torch.arange(10.0)}
    checkpoint.save(out, 2, state, keep=1)
    checkpoint.save(out, 4, state, keep=1)
    assert [s for s, _ in list_checkpoints(out)] == [4] and manifest.check(list_checkpoints(out)[0][1]) is None
    monkeypatch.setattr(manifest, "check", lambda path: "read back wrong")  # the disk returned other bytes
    checkpoint.save(out, 6, state, keep=1)
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]  # the verified one stays
    assert "older checkpoints are kept" in capsys.readouterr().err


# ------------------------------------------------------------------ a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A real 48 MB tmpfs (root only); skipped with the reason where mount fails."""
    where = tmp_path / "disk"
    where.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(where)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip() or made.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until ``leave`` bytes are free."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * (shutil.disk_usage(disk).free - leave))
    return filler


def test_a_full_disk_during_a_checkpoint_exits_74_and_leaves_the_last_one_whole(small_disk, tiny, monkeypatch,
                                                                                capsys, tmp_path):
    """The disk fills after step 3 (a file written from the metrics log): the step-4 save fails
    with one line naming the file and the bytes; no temporary file is left; step 2 resumes,
    once the disk has room again, to the uninterrupted run's bits."""
    from dude.train import rundir

    run = small_disk / "run"
    args = tiny_train_args(tiny, run, 6, "--save-every", "2", "--keep-checkpoints", "1")
    append = rundir.MetricsLog.append

    def fill_after_step_3(self, record):
        append(self, record)
        if record["step"] == 3:
            _fill(small_disk, 16 << 10)  # a checkpoint of the tiny run is ~117 kB

    monkeypatch.setattr(rundir.MetricsLog, "append", fill_after_step_3)
    assert main(args) == EXIT_IO
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(rf"dude train: error: cannot write '{run / 'checkpoints' / 'step-000004.pt'}': the disk is "
                        r"full \(it needs [\d.]+ kB, [\d.]+ kB free there\); nothing partial was left", err[-1]), err[-1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002.pt", "step-000002.pt.manifest.json"]
    assert not (run / LOCK).exists()
    monkeypatch.undo()
    (small_disk / "filler").unlink()
    assert main([*args, "--resume"]) == 0
    assert f"continuing from {run / 'checkpoints' / 'step-000002.pt'}" in capsys.readouterr().out
    assert main(tiny_train_args(tiny, tmp_path / "full", 6)) == 0
    assert _same(_adapter(tmp_path / "full"), _adapter(run))


def test_a_full_disk_warns_at_start_and_fails_dude_save_and_export_cleanly(small_disk, capsys):
    import dude

    model = dude.apply(tiny_llama(), dude.AdapterConfig(method="dude", r=4, alpha=8))
    dude.save(model, small_disk / "adapter")
    before = (small_disk / "adapter" / "adapter_model.safetensors").read_bytes()
    _fill(small_disk, 4 << 10)
    with torch.no_grad():
        dude.adapter_parameters(model)[0].add_(1.0)
    with pytest.raises(WriteFailed, match=r"adapter_model.safetensors'?: the disk is full \(it needs .* free there\)"):
        dude.save(model, small_disk / "adapter")
    assert "warning: " in capsys.readouterr().err
    assert sorted(p.name for p in (small_disk / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    assert (small_disk / "adapter" / "adapter_model.safetensors").read_bytes() == before  # the old one intact
    with pytest.raises(WriteFailed, match="merged.*the disk is full"):
        dude.export_merged(model, small_disk / "merged")
    assert sorted(p.name for p in small_disk.iterdir()) == ["adapter", "filler"]  # no staging folder left
    capsys.readouterr()
    with pytest.raises(WriteFailed):  # a start with too little room warns, then fails on a write
        train(_cfg(small_disk / "run", save_every=2), tiny_llama(), _Tok(), _examples())
    assert re.search(r"warning: [\d.]+ k?B free on the disk of .*run', the checkpoints kept \(run.keep_checkpoints 2\) "
                     r"and the adapter need about [\d.]+ kB", capsys.readouterr().err)


def test_a_patched_writer_that_fails_like_torch_on_a_full_disk(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: torch.save's own full-disk error, and an EIO."""
    out = tmp_path / "run"
    checkpoint.save(out, 2, {"w": torch.ones(4)}, keep=1)
    for error in (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
                  OSError(errno.EIO, "Input/output error")):
        def broken(obj, fh, error=error):
            fh.write(b"partial")
            raise error

        monkeypatch.setattr(checkpoint.torch, "save", broken)
        with pytest.raises(WriteFailed, match=r"cannot write '.*step-000004.pt': .*nothing partial was left") as info:
            checkpoint.save(out, 4, {"w": torch.ones(1000)}, keep=1)
        assert info.value.errno == (errno.ENOSPC if isinstance(error, RuntimeError) else errno.EIO)
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002.pt",
                                                                           "step-000002.pt.manifest.json"]


# ------------------------------------------------------------------ one run per folder


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dude.train.runlock import FolderLock; "
                               f"FolderLock({str(tmp_path)!r}, 'holder').acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FolderBusy, match=rf"in use by holder \(pid {holder.pid} on "):
        FolderLock(tmp_path, "second").acquire()
    holder.kill()
    holder.wait()
    assert (tmp_path / LOCK).exists()  # left behind; its flock went with the process
    with FolderLock(tmp_path, "third"):
        assert json.loads((tmp_path / LOCK).read_text())["command"] == "third"
    assert not (tmp_path / LOCK).exists()


def test_compare_and_the_study_refuse_a_busy_root(tmp_path):
    from dude.compare import CompareConfig, run_compare
    from dude.train.options import build

    sys.path.insert(0, str(Path(__file__).parents[1] / "studies" / "paper_claims"))
    from runner import Study
    from test_study import TINY

    with FolderLock(tmp_path, "someone"):
        with pytest.raises(FolderBusy, match="is in use by someone"):
            run_compare(build(CompareConfig, {"run": {"output_dir": str(tmp_path)}}))
        with pytest.raises(FolderBusy, match="study root .* is in use by someone"):
            Study(TINY, tmp_path, runner=lambda item, out: True, log=lambda m: None).run()
