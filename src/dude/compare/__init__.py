"""``dude compare``: LoRA, DoRA, PiSSA and DuDe on the same task, budget and seeds.

    from dude.compare import CompareConfig, run_compare
    report = run_compare(CompareConfig())     # the README's main job, ~12 min on 2 CPU cores

Each (method, seed) is one ``dude train`` run in its own process (so peak memory is
measured per method and one failure does not stop the others), in
``<run.output_dir>/<method>-seed<k>/``. The base model is evaluated once, for the
"before" of knowledge retention. The report: a printed table, ``compare.md``,
``compare.json`` (everything) and ``loss_curves.png``.
"""

from .config import CompareConfig, CompareSpec
from .runner import run_compare

__all__ = ["CompareConfig", "CompareSpec", "run_compare"]
