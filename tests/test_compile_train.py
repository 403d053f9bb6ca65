"""``dude train --compile`` (run.compile): the same adapter as eager training, by whole
model and block by block, and a compiled run that resumes from its checkpoint.

The compiler runs with ``aot_eager`` (AOTAutograd's graphs, no code generation) to keep
these fast; test_compile.py runs inductor once.
"""

from __future__ import annotations

import pytest
import torch
from test_train import _adapter, _cfg, _examples, _Tok
from tiny_models import tiny_llama
from torch import nn

from dude.train import train
from dude.train.checkpoint import list_checkpoints


@pytest.fixture
def aot_eager(monkeypatch):
    """``nn.Module.compile`` with the aot_eager backend; counts the modules compiled."""
    compiled, original = [], nn.Module.compile

    def compile_(self, **kwargs):
        compiled.append(type(self).__name__)
        original(self, backend="aot_eager", **kwargs)

    monkeypatch.setattr(nn.Module, "compile", compile_)
    torch._dynamo.reset()
    yield compiled
    torch._dynamo.reset()


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)  # six Adam steps at lr 1e-2 amplify float32 rounding


@pytest.mark.parametrize("ckpt", [False, True])
def test_compiled_training_gives_the_eager_adapter(ckpt, aot_eager, tmp_path):
    eager = train(_cfg(tmp_path / "eager", gradient_checkpointing=ckpt), tiny_llama(), _Tok(), _examples())
    compiled = train(_cfg(tmp_path / "compiled", gradient_checkpointing=ckpt, compile=True), tiny_llama(), _Tok(),
                     _examples())
    assert aot_eager == (["LlamaDecoderLayer"] * 2 if ckpt else ["LlamaForCausalLM"])
    assert compiled.final_loss == pytest.approx(eager.final_loss, rel=1e-5)
    _close(_adapter(tmp_path / "compiled"), _adapter(tmp_path / "eager"))


def test_compiled_run_resumes_from_its_checkpoint(aot_eager, tmp_path):
    out = tmp_path / "run"
    whole = train(_cfg(out, save_every=2, compile=True), tiny_llama(), _Tok(), _examples())
    final = _adapter(out)
    (out / "adapter_model.safetensors").unlink()
    newest = list_checkpoints(out)[-1]
    assert newest[0] == 4
    newest[1].unlink() if newest[1].is_file() else None  # continue from step 2
    resumed = train(_cfg(out, save_every=2, compile=True, resume=True), tiny_llama(), _Tok(), _examples())
    assert resumed.final_loss == pytest.approx(whole.final_loss, rel=1e-6)
    _close(_adapter(out), final)
