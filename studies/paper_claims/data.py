"""The study's data files: GSM-symbolic cut three ways, and a retention text the task does not teach.

GSM-symbolic ships 24 generated variants of each of its 100 templates
(``dude.data.gsm_symbolic``). The library's template split (70 train / 30 test templates,
seed 0) is kept; inside each of the 70 train templates the 24 variants are shuffled
(seeded, per template) and cut into disjoint parts:

    variants 0 .. id_per-1   -> gsm-id-*.jsonl     in-distribution test (70 x 6 = 420)
    next val_per             -> gsm-val-*.jsonl    validation, the lr sweep's criterion (70 x 1 = 70)
    next train_per           -> gsm-train-*.jsonl  training set (70 x 3 = 210)

and ``ood_per`` variants of each of the 30 held-out templates -> gsm-ood-*.jsonl (30 x 3 = 90)
(out of distribution: templates never trained on). No question is in two files.

Retention text: the chain-of-thought explanations of the 282 MMLU dev questions (in a seeded
random order, so the study's limit of 141 is a sample across subjects)
(lm-eval's flan CoT prompts: question + lettered choices -> "Let's think step by step.
... The answer is (X)."), as ``{"prompt", "response"}``: science, law, history prose
that GSM training does not teach. Its response loss before vs after training measures
forgetting.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SPLIT_SEED = 1234  # the per-template variant shuffle (the template split is the library's, seed 0)


@dataclass(frozen=True)
class GsmCut:
    """Variants per template in each part (train templates: id + val + train <= 24)."""

    train_per: int = 3
    val_per: int = 1
    id_per: int = 6
    ood_per: int = 3

    def __post_init__(self) -> None:
        if self.id_per + self.val_per + self.train_per > 24 or min(self.train_per, self.val_per, self.id_per,
                                                                     self.ood_per) < 1:
            raise ValueError(f"GsmCut {self}: each part needs >= 1 variant and id+val+train <= 24 per template")


FILES = ("train", "val", "id", "ood", "retention")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    tmp.replace(path)


def gsm_parts(cut: GsmCut) -> dict[str, list[dict]]:
    """``{"train", "val", "id", "ood"}`` -> rows ``{"question", "answer", "template_id"}``."""
    from dude.data.gsm_symbolic import gsm_symbolic, template_split

    train_ids, test_ids = template_split()
    by_template: dict[int, list[dict]] = {}
    for row in gsm_symbolic("train") + gsm_symbolic("heldout_variants") + gsm_symbolic("test"):
        by_template.setdefault(row["template_id"], []).append(row)
    parts: dict[str, list[dict]] = {"train": [], "val": [], "id": [], "ood": []}
    for tid in sorted(by_template):
        rows = sorted(by_template[tid], key=lambda r: r["question"])
        random.Random(SPLIT_SEED + tid).shuffle(rows)
        if tid in test_ids:
            parts["ood"] += rows[:cut.ood_per]
            continue
        a, b = cut.id_per, cut.id_per + cut.val_per
        parts["id"] += rows[:a]
        parts["val"] += rows[a:b]
        parts["train"] += rows[b:b + cut.train_per]
    assert set(train_ids) == {r["template_id"] for r in parts["train"]}
    for name, rows in parts.items():  # templates mixed, so the files read as a random sample
        random.Random(SPLIT_SEED).shuffle(rows)
    return parts


def retention_rows() -> list[dict]:
    """The 282 MMLU dev questions with their CoT explanation as the response (shipped with dude)."""
    from dude.data import load_task

    return load_task("mmlu_explanations")


def write_files(data_dir: Path, cut: GsmCut) -> dict[str, Path]:
    """The five files under ``data_dir`` (written once; their content is in the run keys)."""
    tag = f"{cut.train_per}-{cut.val_per}-{cut.id_per}-{cut.ood_per}"
    paths = {name: data_dir / (f"gsm-{name}-{tag}.jsonl" if name != "retention" else "mmlu-cot.jsonl")
             for name in FILES}
    if all(p.is_file() for p in paths.values()):
        return paths
    data_dir.mkdir(parents=True, exist_ok=True)
    parts = gsm_parts(cut)
    for name in ("train", "val", "id", "ood"):
        _write_jsonl(paths[name], [{"question": r["question"], "answer": r["answer"]} for r in parts[name]])
    retention = retention_rows()
    random.Random(SPLIT_SEED).shuffle(retention)  # subjects mixed: a limit takes a random sample
    _write_jsonl(paths["retention"], retention)
    return paths
