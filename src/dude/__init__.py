"""dude: DuDe (arXiv:2505.14367) beside LoRA, DoRA and PiSSA, in one adapter layer.

    import dude
    model, tokenizer = dude.load_model()
    dude.apply(model, dude.AdapterConfig(method="dude", r=16, alpha=16))
    dude.save(model, "out/")
    plain = dude.merge(model)

Importing this package needs only torch; transformers, peft and safetensors are
imported by the functions that use them.
"""

from .config import AdapterConfig
from .hub import load_model
from .io import export_merged, load, save
from .layer import AdapterLinear
from .patch import adapter_layers, adapter_parameters, apply, merge

__all__ = [
    "AdapterConfig",
    "AdapterLinear",
    "adapter_layers",
    "adapter_parameters",
    "apply",
    "export_merged",
    "load",
    "load_model",
    "merge",
    "save",
]
__version__ = "0.1.0"
