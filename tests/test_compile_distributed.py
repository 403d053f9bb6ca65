"""FSDP2 + ``--compile`` on 2 CPU processes (gloo): every rank compiles its decoder blocks
(compiling.py), and the run gives the adapter one eager process accumulating the same two
micro-batches gives. Slow: two processes compile with inductor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_distributed import PYTHON, TORCHRUN, _adapter, _losses, _run
from test_train import make_math_file, make_tiny_model_dir, tiny_train_args


@pytest.mark.slow
def test_fsdp_with_compile_matches_one_eager_process(tmp_path, smollm2_dir):
    make_tiny_model_dir(tmp_path / "model", smollm2_dir)
    make_math_file(tmp_path / "math.jsonl")
    common = ["--dropout", "0.0", "--lr", "2e-2", "--save-every", "2"]
    _run([*PYTHON, "dude.cli"], tiny_train_args(tmp_path, tmp_path / "single", 4, *common, "--grad-accum", "2"))
    log = _run(TORCHRUN, tiny_train_args(tmp_path, tmp_path / "fsdp", 4, *common, "--grad-accum", "1",
                                         "--strategy", "fsdp", "--compile"))
    assert "compile: true" in (tmp_path / "fsdp" / "config.yaml").read_text(), log
    assert (tmp_path / "fsdp" / "checkpoints" / "step-000002").is_dir()
    single, fsdp = _adapter(tmp_path / "single"), _adapter(tmp_path / "fsdp")
    assert single.keys() == fsdp.keys()
    for key in single:
        torch.testing.assert_close(fsdp[key], single[key], rtol=1e-4, atol=1e-5)
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(Path(tmp_path / "single")), rel=1e-5)
