"""The standard tools as real clients of dude, on the real SmolLM2-135M-Instruct.

- TRL's ``SFTTrainer`` trains a dude-adapted model (a few steps); ``dude.save`` of it
  loads in PEFT with the same logits. TRL tokenizes its prompt/completion formats exactly
  as ``dude.data`` does (same ids, same loss mask).
- lm-eval (``simple_evaluate``, HF model with ``peft=<adapter dir>``), offline, on a local
  multiple-choice task holding the first MMLU dev questions in dude's prompt, agrees with
  ``dude eval`` question by question: the same letter, log-likelihoods within 1e-3.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import dude
from dude.cli import main
from dude.data import build_sft_examples, load_task
from dude.data.prompts import LETTERS, mc_prompt

DATA = Path(__file__).parent / "data"
N_QUESTIONS = 24


@pytest.fixture(scope="module")
def trl_run(tmp_path_factory, smollm2_dir):
    """A DuDe adapter trained by TRL's SFTTrainer for 3 steps, saved with dude.save."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from dude.hub import load_model

    root = tmp_path_factory.mktemp("trl")
    model, tokenizer = load_model(smollm2_dir, dtype=torch.float32)
    dude.apply(model, dude.AdapterConfig(method="dude", r=4, alpha=8, svd="randomized"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rows = [json.loads(line) for line in (DATA / "prompt_completion_chat.jsonl").read_text().splitlines()] * 3
    args = SFTConfig(output_dir=str(root / "trl"), max_steps=3, per_device_train_batch_size=2, learning_rate=2e-3,
                     report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True,
                     max_length=128, bf16=False)  # TRL's default bf16 leaves an autocast forward behind
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    result = trainer.train()
    model.eval()
    dude.save(model, root / "adapter")
    return {"model": model, "tokenizer": tokenizer, "trainer": trainer, "result": result, "before": before,
            "adapter": root / "adapter", "root": root}


def test_trl_sft_trainer_trains_a_dude_model_that_peft_loads(trl_run, smollm2_dir):
    from peft import PeftModel

    from dude.hub import load_model

    model, result = trl_run["model"], trl_run["result"]
    assert result.global_step == 3 and all(torch.isfinite(torch.tensor(e["loss"]))
                                           for e in trl_run["trainer"].state.log_history if "loss" in e)
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], p) for n, p in trl_run["before"].items())  # every adapter tensor moved
    ids = trl_run["tokenizer"]("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = model(ids).logits
        base = load_model(smollm2_dir, dtype=torch.float32)[0].eval()(ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft = PeftModel.from_pretrained(load_model(smollm2_dir, dtype=torch.float32)[0], trl_run["adapter"]).eval()
        theirs = peft(ids).logits
    assert (ours - base).abs().max() > 0.1  # training moved the model well past the tolerance below
    # PEFT's unmerged rank-2r DoRA re-associates W_res + s B0 A0: float32 rounding, ~2e-4 on SmolLM2's logits
    torch.testing.assert_close(theirs, ours, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("name", ["prompt_completion_chat", "prompt_completion"])
def test_trl_tokenizes_prompt_completion_files_as_dude_does(trl_run, name):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = trl_run["tokenizer"]
    rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]
    args = SFTConfig(output_dir=str(trl_run["root"] / name), report_to=[], use_cpu=True, max_length=512, bf16=False)
    trainer = SFTTrainer(model=trl_run["model"], args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    ours = build_sft_examples(tokenizer, load_task("file", path=DATA / f"{name}.jsonl"), 512)
    theirs = list(trainer.train_dataset)
    assert [r["input_ids"] for r in theirs] == [e["input_ids"] for e in ours]
    assert [r["labels"] for r in theirs] == [e["labels"] for e in ours]


def _lm_eval_task(root: Path, questions: list[dict]) -> Path:
    """A local lm-eval task: dude's MMLU prompt, the letters as choices, " A" scored after it."""
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps({"prompt": mc_prompt(ex, ex.get("subject")), "answer": ex["answer"],
                                        "letters": list(LETTERS[:len(ex["choices"])])}) + "\n" for ex in questions))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "dude_mmlu_dev.yaml").write_text(
        "task: dude_mmlu_dev\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_choice: letters\ndoc_to_target: answer\n'
        'target_delimiter: " "\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n')
    return tasks


def test_lm_eval_agrees_with_dude_eval_question_by_question(trl_run, smollm2_dir, tmp_path, monkeypatch, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    questions = load_task("mmlu_dev", limit=N_QUESTIONS)
    # only the local task: indexing lm-eval's thousands of built-in task files takes most of a minute
    tasks = TaskManager(include_path=str(_lm_eval_task(tmp_path, questions)), include_defaults=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        harness = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(smollm2_dir), "peft": str(trl_run["adapter"]), "dtype": "float32"},
            tasks=["dude_mmlu_dev"], task_manager=tasks,
            log_samples=True, batch_size=8, device="cpu")
    samples = sorted(harness["samples"]["dude_mmlu_dev"], key=lambda s: s["doc_id"])
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]

    assert main(["eval", "--adapter", str(trl_run["adapter"]), "--name-or-path", str(smollm2_dir), "--tasks", "mmlu",
                 "--mmlu-limit", str(N_QUESTIONS), "--output-dir", str(tmp_path / "eval")]) == 0
    ours = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]["mmlu"]

    assert len(theirs) == len(ours["predictions"]) == N_QUESTIONS
    agree = sum(int(max(range(len(t)), key=t.__getitem__) == p) for t, p in zip(theirs, ours["predictions"]))
    gap = max(abs(a - b) for t, o in zip(theirs, ours["letter_logprobs"]) for a, b in zip(t, o))
    with capsys.disabled():
        print(f"\nlm-eval vs dude eval on {N_QUESTIONS} MMLU dev questions: {agree}/{N_QUESTIONS} same letter, "
              f"max |log-likelihood gap| {gap:.2e}, accuracy {harness['results']['dude_mmlu_dev']['acc,none']:.3f} "
              f"vs {ours['accuracy']:.3f}")
    assert agree == N_QUESTIONS and gap < 1e-3
    assert harness["results"]["dude_mmlu_dev"]["acc,none"] == pytest.approx(ours["accuracy"])
