"""The measures of one run (or of the base model), computed after training, cached per measure.

    python studies/paper_claims/measures.py RUN_DIR   # reads RUN_DIR/measure-request.json

The request (written by the runner) names the measures wanted and the files they read:

- ``val``, ``id``, ``ood``, ``retention``: response loss (``valloss.response_loss``) of the
  validation, in-distribution test, out-of-distribution test and retention files;
- ``accuracy``: greedy exact-match accuracy on the in-distribution test file (first
  ``accuracy_limit`` problems), with ``correct`` per problem for paired comparisons.

Results are merged into ``RUN_DIR/measures.json``; a measure already there (with the same
``fingerprint``: file content and settings) is not redone, so a sweep run later chosen as
a main run only adds the measures it lacked. Without an
``adapter_config.json`` in RUN_DIR the base model is measured (the "before" of retention).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

LOSS_SETS = ("val", "id", "ood", "retention")
ALL = (*LOSS_SETS, "accuracy")


@lru_cache(maxsize=32)
def _file_digest(path: str, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fingerprint(request: dict[str, Any], name: str) -> str:
    """What a measure's value depends on besides the weights: its file's content and the
    settings that read it. A cached measure counts only while its fingerprint matches, so a
    changed eval set or limit is measured again rather than mixed in."""
    source = request["files"]["id" if name == "accuracy" else name]
    settings = ({"limit": request.get("accuracy_limit"), "max_new_tokens": request["max_new_tokens"]}
                if name == "accuracy" else {"limit": request.get("limits", {}).get(name)})
    digest = _file_digest(str(source), Path(source).stat().st_mtime_ns)
    return hashlib.sha256(json.dumps([digest, settings], sort_keys=True).encode()).hexdigest()[:12]


def measured(done: dict[str, Any], request: dict[str, Any]) -> bool:
    """Every measure of ``request`` is in ``done`` with the current fingerprint."""
    return all(done.get(m, {}).get("fingerprint") == fingerprint(request, m) for m in request["measures"])


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    return rows[:limit] if limit is not None else rows


def load_model(run_dir: Path) -> tuple[Any, Any]:
    """The base model with the run's adapter merged in (the same function, faster), or the base."""
    import dude
    from dude.train.commands import load_for
    from dude.train.config import ModelConfig

    adapter = str(run_dir) if (run_dir / "adapter_config.json").is_file() else None
    if adapter is None and (run_dir / "run-config.yaml").is_file():  # a training run: never the base by mistake
        raise FileNotFoundError(f"{run_dir} is a training run without its adapter (adapter_config.json); train it again")
    model, tokenizer, _ = load_for(ModelConfig(), adapter)
    if adapter is not None:
        dude.merge(model)
    return model, tokenizer


def compute(run_dir: Path, request: dict[str, Any], done: dict[str, Any]) -> dict[str, Any]:
    """The wanted measures that ``done`` lacks."""
    from dude.evaluate.math import evaluate_math

    from valloss import response_loss

    todo = [m for m in request["measures"] if done.get(m, {}).get("fingerprint") != fingerprint(request, m)]
    if not todo:
        return {}
    model, tokenizer = load_model(run_dir)
    out: dict[str, Any] = {}
    for name in todo:
        start = time.perf_counter()
        if name in LOSS_SETS:
            rows = read_jsonl(request["files"][name], request.get("limits", {}).get(name))
            longest = request["retention_max_length"] if name == "retention" else request["max_length"]
            out[name] = response_loss(model, tokenizer, rows, longest, request["eval_batch"])
        elif name == "accuracy":
            rows = read_jsonl(request["files"]["id"], request.get("accuracy_limit"))
            result = evaluate_math(model, tokenizer, rows, batch_size=request["gen_batch"],
                                   max_new_tokens=request["max_new_tokens"])
            out[name] = {"accuracy": result["accuracy"], "n": result["n"], "correct": result["correct"],
                         "per_item": [int(p["correct"]) for p in result["predictions"]]}
        else:
            raise ValueError(f"unknown measure {name!r}; known: {ALL}")
        out[name].update(seconds=round(time.perf_counter() - start, 1), fingerprint=fingerprint(request, name))
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in out[name].items() if k != "per_item"), flush=True)
    return out


def main() -> None:
    run_dir = Path(sys.argv[1])
    request = json.loads((run_dir / "measure-request.json").read_text())
    path = run_dir / "measures.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    done.update(compute(run_dir, request, done))
    done["load_average"] = list(os.getloadavg())
    tmp = run_dir / ".tmp-measures.json"
    tmp.write_text(json.dumps(done, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
