"""Regenerate ``mmlu_dev.jsonl.gz`` and ``gsm8k_cot_exemplars.jsonl.gz`` from the lm-eval wheel.

    python -m dude.data.build_lm_eval_data [--out-dir DIR]

``lm-eval==0.4.13`` (EleutherAI, MIT) carries the 282 MMLU dev questions (5 per
subject, 57 subjects) inside its flan chain-of-thought few-shot prompts
(``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json``) and the 8 standard GSM8K
chain-of-thought exemplars (``lm_eval/tasks/gsm8k/gsm8k-cot.yaml``). They are parsed
once, here, and shipped with dude (``LICENSES.md`` beside them): nothing is downloaded
at run time, so a package index that drops the wheel breaks nothing but this script.

Output: gzip JSONL. Line 1 is a header ``{"meta": {...}}`` (package, version, wheel
sha256, source member); then one object per example:

- MMLU: ``{"subject", "question", "choices", "answer": int, "explanation"}`` in subject
  order (one subject's prompt carries a stray explanation line inside a question, kept
  as shipped; one question has five choices, the rest four);
- GSM8K: ``{"question", "answer"}`` with the answer in GSM8K format (``... #### n``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import tempfile
import zipfile
from pathlib import Path

from ..cache import check_sha256, pip_download

PACKAGE, VERSION = "lm-eval", "0.4.13"
WHEEL_SHA256 = "5daaa1973bf874005f64f28d3834b875f6886f0d6475878e6a6c821994a5286a"
MMLU_MEMBER = "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"
GSM8K_MEMBER = "lm_eval/tasks/gsm8k/gsm8k-cot.yaml"
HERE = Path(__file__).parent


def parse_mmlu_subject(subject: str, text: str) -> list[dict]:
    """One subject's few-shot prompt -> questions with choices, answer index and explanation."""
    body = text.split("\n\n", 1)[1]  # drop "The following are multiple choice questions ..."
    examples = []
    for block in re.split(r"(?:^|\n\n)Q: ", body):
        if not block.strip():
            continue
        m = re.match(r"(?s)(.*?)\n(\(A\) .*?)\nA: (.*)", block)
        if m is None:
            raise ValueError(f"MMLU dev ({subject}): cannot parse question {block[:80]!r}")
        question, choice_text, explanation = m.groups()
        parts = re.split(r"(?:^|\s)\(([A-J])\) ", choice_text)
        letters, choices = parts[1::2], [c.strip() for c in parts[2::2]]
        answer = re.findall(r"answer is \(?([A-J])\)?", explanation)
        if letters != [chr(65 + i) for i in range(len(letters))] or not answer:
            raise ValueError(f"MMLU dev ({subject}): bad choices or answer in {block[:80]!r}")
        examples.append({"subject": subject, "question": question.strip(), "choices": choices,
                         "answer": ord(answer[-1]) - 65, "explanation": explanation.strip()})
    return examples


def parse_gsm8k_exemplars(text: str) -> list[dict]:
    """lm-eval's GSM8K CoT few-shot samples -> ``{"question", "answer"}`` in GSM8K format."""
    import yaml

    out = []
    for sample in yaml.safe_load(text)["fewshot_config"]["samples"]:
        target = " ".join(sample["target"].split())
        number = re.findall(r"The answer is (-?[\d,.]+)\.", target)[-1]
        out.append({"question": " ".join(sample["question"].split()), "answer": f"{target}\n#### {number}"})
    return out


def _write(path: Path, meta: dict, rows: list[dict]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with gzip.GzipFile(tmp, "wb", mtime=0) as raw:  # mtime 0: the same bytes on every rebuild
        raw.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [{"meta": meta}, *rows]).encode())
    tmp.replace(path)


def build(out_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(f"{PACKAGE}=={VERSION}", Path(tmp))
        check_sha256(wheel, WHEEL_SHA256, f"wheel {PACKAGE}=={VERSION}")
        with zipfile.ZipFile(wheel) as zf:
            prompts = json.loads(zf.read(MMLU_MEMBER))
            gsm8k_text = zf.read(GSM8K_MEMBER).decode()
    meta = {"package": PACKAGE, "version": VERSION, "wheel_sha256": WHEEL_SHA256, "licence": "MIT"}
    mmlu = [ex for subject in sorted(prompts) for ex in parse_mmlu_subject(subject, prompts[subject])]
    _write(out_dir / "mmlu_dev.jsonl.gz", {**meta, "member": MMLU_MEMBER, "n": len(mmlu)}, mmlu)
    shots = parse_gsm8k_exemplars(gsm8k_text)
    _write(out_dir / "gsm8k_cot_exemplars.jsonl.gz", {**meta, "member": GSM8K_MEMBER, "n": len(shots)}, shots)
    print(f"wrote {len(mmlu)} MMLU dev questions and {len(shots)} GSM8K exemplars to {out_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=HERE)
    build(parser.parse_args().out_dir)


if __name__ == "__main__":
    main()
