"""dude.load_model: the built-in SmolLM2 from its PyPI wheel, local folders, bad paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dude.cache import cached_entry, check_sha256
from dude.hub import default_model_dir, load_model


def test_default_model_is_smollm2(smollm2) -> None:
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 134.5e6) < 0.1e6, n_params
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None
    assert tokenizer.chat_template  # kept: data formatting relies on it
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # A real pretrained model, not random weights: it knows the obvious continuation.
    next_token = tokenizer.decode(logits[0, -1].argmax())
    assert "Paris" in next_token, next_token


def test_second_load_comes_from_cache(smollm2_dir: Path, monkeypatch) -> None:
    from dude import hub

    assert (smollm2_dir / "model.safetensors").is_file()
    assert not list(smollm2_dir.rglob("*.gguf")) and not list(smollm2_dir.rglob("*.whl"))
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime

    def no_rebuild(out: Path) -> None:
        raise AssertionError(f"the cached model was fetched or converted again into {out}")

    monkeypatch.setattr(hub, "_build_smollm2", no_rebuild)  # no GGUF conversion (~18 s)
    monkeypatch.setattr(hub, "_fetch_smollm2_gguf", no_rebuild)
    assert default_model_dir() == smollm2_dir
    model, _ = load_model()
    assert (smollm2_dir / "model.safetensors").stat().st_mtime == stamp
    assert type(model).__name__ == "LlamaForCausalLM"


def test_dtype_option(smollm2_dir: Path) -> None:
    model, _ = load_model(smollm2_dir, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_bad_paths_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle checkpoints are refused"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        load_model(tmp_path / "config.json")


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUDE_CACHE", str(tmp_path))
    bad = tmp_path / "blob"
    bad.write_bytes(b"tampered")

    def build(out: Path) -> None:
        (out / "half_written").write_text("x")
        check_sha256(bad, "0" * 64, "test blob")

    with pytest.raises(ValueError, match="sha256 mismatch for test blob"):
        cached_entry("entry", build)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["blob"]
    # A successful build appears atomically and is not rebuilt.
    calls = []
    entry = cached_entry("entry", lambda out: calls.append((out / "f").write_text("ok")))
    assert (entry / "f").read_text() == "ok"
    assert cached_entry("entry", lambda out: calls.append(1)) == entry and len(calls) == 1


_BUILDER = """
import sys, time
from pathlib import Path
from dude.cache import cached_entry

def build(out: Path) -> None:
    with open(sys.argv[1], "a") as log:
        log.write("build\\n")
    time.sleep(1.0)  # both processes are inside cached_entry by now
    (out / "weights").write_text("complete")

print(cached_entry("shared", build))
"""


def test_concurrent_processes_build_once(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "DUDE_CACHE": str(tmp_path / "cache")}
    log = tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", _BUILDER, str(log)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1] == str(tmp_path / "cache" / "shared")
    assert log.read_text() == "build\n"
    assert (tmp_path / "cache" / "shared" / "weights").read_text() == "complete"
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


def test_the_shipped_gguf_is_kept_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dude.cache import sha256_file
    from dude.hub import SMOLLM2_GGUF_SHA256, default_gguf_path

    path = default_gguf_path()  # the real entry (a cache built before it was kept fetches it once)
    assert path.parent.name == "SmolLM2-135M-Instruct-gguf" and sha256_file(path) == SMOLLM2_GGUF_SHA256
    monkeypatch.setenv("DUDE_CACHE", str(tmp_path))
    damaged = tmp_path / "SmolLM2-135M-Instruct-gguf" / path.name
    damaged.parent.mkdir()
    damaged.write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"sha256 mismatch .* the cache entry is damaged; delete .* fetched again"):
        default_gguf_path()
