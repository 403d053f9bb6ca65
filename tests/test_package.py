"""What a user meets first: the import, the public names."""

import subprocess
import sys


def test_import_needs_only_torch():
    code = ("import sys, dude; heavy = [m for m in ('transformers', 'peft', 'safetensors', 'datasets', 'yaml', "
            "'matplotlib') if m in sys.modules]; print(heavy); assert not heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_api():
    import dude

    for name in ("AdapterConfig", "apply", "save", "load", "merge", "load_model", "export_merged",
                 "adapter_parameters", "adapter_layers"):
        assert callable(getattr(dude, name)), name
