"""``run.compile``: torch.compile on the model being trained, in place.

Whole model by default (one graph: the adapters' elementwise work fuses with what is
around it). Block by block with gradient checkpointing or FSDP2, as torchtitan does:
a checkpointed block recomputes its compiled forward in backward, and FSDP2's per-block
all-gathers stay outside the graphs. ``nn.Module.compile`` keeps the module and its
parameter names, so checkpoints, resume and the saved adapter do not change.
"""

from __future__ import annotations

import torch
from torch import nn


def blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks: transformers' checkpointing units (the ones FSDP2 shards too)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: by name, as distributed.wrap
        GradientCheckpointingLayer = ()
    return [m for m in model.modules()
            if isinstance(m, GradientCheckpointingLayer) or type(m).__name__.endswith("DecoderLayer")]


def compile_model(model: nn.Module, *, per_block: bool) -> None:
    """``torch.compile`` the model, or each of its decoder blocks (``per_block``), in place."""
    if not per_block:
        model.compile()
        return
    found = blocks(model)
    if not found:
        raise ValueError(
            f"run.compile with gradient checkpointing or FSDP compiles decoder blocks, and this "
            f"{type(model).__name__} has none that dude recognises; drop run.compile or those options"
        )
    # transformers' blocks set a context variable (output capture) inside the checkpointed
    # region; dynamo refuses a side effect it would not replay on recompute, and ran each
    # block eagerly. That variable is not read by the recompute: let dynamo skip replaying it.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in found:
        block.compile()
