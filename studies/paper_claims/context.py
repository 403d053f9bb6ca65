"""The report's fixed prose: the study's setup (from its config) and the papers' numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from claims import window
from plan import n_train

REPO = Path(__file__).resolve().parents[2]


def _count(path: Path) -> int:
    return sum(1 for x in path.read_text().splitlines() if x.strip()) if path.is_file() else 0


def setup_lines(study: Any) -> list[str]:
    from plan import data_files

    s, b = study.study, study.study.budget
    files = data_files(s, study.data_dir)
    n = {k: min(_count(p), b.limits.get(k, 10 ** 9)) for k, p in files.items()}
    steps = b.train_steps(n_train(s, study.data_dir))
    epochs = steps * b.batch_size / max(n_train(s, study.data_dir), 1)
    c = b.cut
    return ["## Setup", "",
            "- **Model**: SmolLM2-135M-Instruct (built in, float32, CPU), adapters on all 7 linear projections of "
            f"every block, r = alpha = {s.r}, PiSSA/DuDe factors from a seeded randomized SVD.",
            "- **Data** (GSM-symbolic, 24 generated variants of each of 100 GSM8K templates; the library's 70/30 "
            "template split; `data.py`): "
            f"training set {n['train']} problems ({c.train_per} variants of each of the 70 training templates); "
            f"validation {n['val']} ({c.val_per} other variants each; picks the lr); **in-distribution test** "
            f"{n['id']} ({c.id_per} further variants each: same templates, new numbers and names); "
            f"**out-of-distribution test** {n['ood']} ({c.ood_per} variants of each of the 30 held-out templates). "
            f"No question in two sets. **Retention text**: the {n['retention']} MMLU-dev questions with their "
            "chain-of-thought explanation (lm-eval's flan CoT prompts) as the response: prose the task does not teach.",
            f"- **Budget**: {steps} steps x batch {b.batch_size} = {epochs:.2f} epochs of the training set, max length "
            f"{b.max_length} tokens (the longest example has 430: no answer is cut). AdamW, 10% linear warmup then "
            "cosine to 0, clip 1.0, no weight decay; the same for every method.",
            "- **lr**: a per-method grid on the half-decade ladder, extended past an edge winner (see the sweep).",
            f"- **Main comparison**: each method at its best lr, seeds {s.seeds}; **rank ablation**: r in {s.ranks} "
            "(alpha = r), seed 0, at the r=16 best lr" + "".join(
                f"; at r={r} also at the lr {' and '.join(map(_rungs, rungs))} on the ladder, the validation loss picking"
                for r, rungs in s.rank_lr_rungs.items()) + ".",
            "- **Measures**: response loss (teacher-forced, answer tokens only, token-weighted mean) of the "
            "validation, in-distribution and out-of-distribution sets; forgetting = retention loss after - before; "
            f"convergence = first step whose {window(steps)}-step trailing mean of the training loss reaches LoRA's "
            "mean final value (each method at its own best lr; the same data order per seed for every method); "
            f"greedy accuracy (exact match of the final number, at most {b.max_new_tokens} new tokens) on "
            f"{min(n['id'], b.accuracy_limit or 10 ** 9)} in-distribution problems, with its binomial error.",
            "- **Machine**: 2 CPU cores shared with other jobs; each run is its own one-thread process "
            "(`STUDY_THREADS` overrides), `--jobs` side by side; wall times compare only as ratios within a table.",
            "- **Cache**: `runs/<key>/`, key = sha256 of the resolved `dude train` config (minus output options; "
            "minus SVD options for LoRA/DoRA) and of the data files it reads; the measures of a run are added to "
            "its folder as later phases need them.", ""]


def context_lines() -> list[str]:
    lines = ["## The papers' numbers, as context only", "",
             "| source | model | result |", "|---|---|---|",
             "| DuDe paper (arXiv:2505.14367) | 7B-scale | GSM8K 62.53 ± 1.59; MMLU up to 48.35; faster convergence "
             "than LoRA |",
             "| PiSSA paper (arXiv:2404.02948) | LLaMA-3-8B | GSM8K: PiSSA+DoRA 77.51 vs DoRA 72.38 |",
             "| LoRAM, \"The Primacy of Magnitude in Low-Rank Adaptation\" (arXiv:2507.06558) | LLaMA-scale | "
             "spectral inits such as PiSSA gain through a larger weight-update magnitude, not through the principal "
             "directions; a magnitude-scaled init matches them (our control: LoRA at a matched lr) |",
             "| \"Learning Rate Matters: Vanilla LoRA May Suffice\" (arXiv:2602.04998) | several scales | with the lr "
             "tuned per method, LoRA variants land within 1-2% of each other |", "",
             "These are 7-8B models trained on ~100K MetaMathQA examples on GPUs; ours is a 135M model trained for "
             "an epoch of a few hundred problems on CPU. The absolute numbers do not compare; only the *direction* "
             "of the differences between methods is tested here, and a 135M model may behave differently from a "
             "7B one.", "", "## Paper-scale recipes", "",
             "Shipped in `configs/paper/` (they point at user-supplied files: a local 7B model, MetaMathQA as "
             "JSONL, GSM8K and MMLU test sets; see the comments in each file). On a GPU machine:", ""]
    for path in sorted((REPO / "configs" / "paper").glob("*.yaml")):
        command = "compare" if path.name.startswith("compare") else "train"
        lines.append(f"- `dude {command} --config configs/paper/{path.name}`")
    return lines + [""]


def _rungs(k: int) -> str:
    return f"{abs(k)} rung{'s' * (abs(k) > 1)} {'higher' if k > 0 else 'lower'}"
