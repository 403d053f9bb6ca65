"""Real evaluation and training data read out of PyPI packages, cached once.

- ``lm-eval==0.4.13`` (MIT) wheel: the 282 MMLU dev questions (5 per subject, 57
  subjects; ``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json``) and the 8
  standard GSM8K chain-of-thought exemplars (``lm_eval/tasks/gsm8k/gsm8k-cot.yaml``).
- ``bigbench==1.0.0`` (Apache-2.0) sdist, 358 MB: only the ``task.json`` files of a few
  multiple-choice tasks are streamed out of it; the sdist itself is deleted.

Downloads go through pip (``dude.cache``), are checked against pinned sha256 sums, and
the extracted files are kept in the cache.
"""

from __future__ import annotations

import json
import re
import tarfile
import zipfile
from pathlib import Path

from ..cache import cached_entry, check_sha256, pip_download

__all__ = ["BIGBENCH_TASKS", "bigbench_examples", "gsm8k_fewshot", "mmlu_dev"]

LM_EVAL = "lm-eval==0.4.13"
LM_EVAL_SHA256 = "5daaa1973bf874005f64f28d3834b875f6886f0d6475878e6a6c821994a5286a"
LM_EVAL_FILES = {
    "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json": "mmlu_cot_prompts.json",
    "lm_eval/tasks/gsm8k/gsm8k-cot.yaml": "gsm8k-cot.yaml",
}
BIGBENCH = "bigbench==1.0.0"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
# dude task name suffix -> folder under bigbench/benchmark_tasks/ (subtask where the task has them)
BIGBENCH_TASKS = {
    "social_iqa": "social_iqa",
    "strategyqa": "strategyqa",
    "date_understanding": "date_understanding",
    "elementary_math_qa": "elementary_math_qa/question_only",
    "logical_deduction": "logical_deduction/three_objects",
}


def _build_lm_eval(out: Path) -> None:
    wheel = pip_download(LM_EVAL, out / "_download")
    check_sha256(wheel, LM_EVAL_SHA256, f"wheel {LM_EVAL}")
    with zipfile.ZipFile(wheel) as zf:
        for member, name in LM_EVAL_FILES.items():
            (out / name).write_bytes(zf.read(member))
    wheel.unlink()
    (out / "_download").rmdir()


def _lm_eval_dir() -> Path:
    return cached_entry("lm-eval-0.4.13", _build_lm_eval)


def _build_bigbench(out: Path) -> None:
    sdist = pip_download(BIGBENCH, out / "_download")
    check_sha256(sdist, BIGBENCH_SHA256, f"sdist {BIGBENCH}")
    wanted = {f"bigbench-1.0.0/bigbench/benchmark_tasks/{path}/task.json": key
              for key, path in BIGBENCH_TASKS.items()}
    with tarfile.open(sdist, "r|gz") as tf:  # streaming: one pass, nothing else unpacked
        for member in tf:
            if member.name in wanted and member.isfile():
                data = tf.extractfile(member).read()  # type: ignore[union-attr]
                (out / f"{wanted.pop(member.name)}.json").write_bytes(data)
    if wanted:
        raise RuntimeError(f"{BIGBENCH} sdist lacks {sorted(wanted)}")
    sdist.unlink()  # 358 MB, not needed any more
    (out / "_download").rmdir()


def _parse_mmlu_subject(subject: str, text: str) -> list[dict]:
    """Split one subject's few-shot prompt into questions with choices and answer index."""
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
        examples.append({"question": question.strip(), "choices": choices,
                         "answer": ord(answer[-1]) - 65, "subject": subject})
    return examples


def mmlu_dev() -> list[dict]:
    """The 282 MMLU dev questions: ``{"question", "choices", "answer": int, "subject"}``.

    Source: lm-eval's flan chain-of-thought few-shot prompts, which hold the MMLU dev
    split (with one subject's prompt carrying a stray explanation line inside a
    question, kept as shipped). One question has five choices, the rest four.
    """
    prompts = json.loads((_lm_eval_dir() / "mmlu_cot_prompts.json").read_text())
    return [ex for subject in sorted(prompts) for ex in _parse_mmlu_subject(subject, prompts[subject])]


def gsm8k_fewshot() -> list[dict]:
    """The 8 standard GSM8K chain-of-thought exemplars, in GSM8K format (``#### n``)."""
    import yaml

    config = yaml.safe_load((_lm_eval_dir() / "gsm8k-cot.yaml").read_text())
    out = []
    for sample in config["fewshot_config"]["samples"]:
        target = " ".join(sample["target"].split())
        number = re.findall(r"The answer is (-?[\d,.]+)\.", target)[-1]
        out.append({"question": " ".join(sample["question"].split()),
                    "answer": f"{target}\n#### {number}"})
    return out


def bigbench_examples(task: str) -> list[dict]:
    """All examples of a BIG-bench multiple-choice task: ``{"question", "choices", "answer"}``.

    Choices keep BIG-bench's order (``target_scores``); the answer is the index of the
    choice scored 1.
    """
    if task not in BIGBENCH_TASKS:
        raise KeyError(f"unknown BIG-bench task {task!r}; known: {sorted(BIGBENCH_TASKS)}")
    raw = json.loads((cached_entry("bigbench-1.0.0", _build_bigbench) / f"{task}.json").read_text())
    examples = []
    for ex in raw["examples"]:
        choices = list(ex["target_scores"])
        scores = list(ex["target_scores"].values())
        if scores.count(1) != 1:
            continue  # no single correct choice (none in the shipped tasks, guarded anyway)
        examples.append({"question": ex["input"].strip(), "choices": choices,
                         "answer": scores.index(1)})
    return examples
