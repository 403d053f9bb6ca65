"""Data formats recognised from the columns (tests/data/*.jsonl), the loss on assistant
tokens only, the column mapping, the seeded held-out split of a training file, switching
evaluation off, and the response loss of text eval sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train import make_tiny_model_dir

from dude.cli import main
from dude.data import IGNORE_INDEX, build_sft_examples, load_task, read_file
from dude.train.config import DataConfig
from dude.train.tasks import eval_examples, train_examples

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name, fmt, first", [
    ("alpaca", "alpaca", {"prompt": "Give the capital of France.", "response": "Paris."}),
    ("metamath", "metamath", {"prompt": "What is 3 + 4?", "response": "3 + 4 = 7. The answer is: 7"}),
    ("prompt_completion", "prompt_completion", {"prompt": "The sky is", "completion": " blue."}),
    ("prompt_completion_chat", "prompt_completion", {"messages": [
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "Blue."}], "prompt_turns": 2}),
    ("messages", "messages", {"messages": [
        {"role": "user", "content": "Hi, who are you?"}, {"role": "assistant", "content": "A small assistant."},
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}], "prompt_turns": 0}),
    ("sharegpt", "sharegpt", {"messages": [
        {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Pear."}], "prompt_turns": 0}),
])
def test_each_format_is_recognised_from_its_columns(name, fmt, first):
    examples, found = read_file(DATA / f"{name}.jsonl")
    assert found == fmt and examples[0] == first
    assert read_file(DATA / f"{name}.jsonl", format=fmt)[0] == examples  # naming it gives the same


def test_alpaca_input_joins_the_instruction():
    examples = load_task("file", path=DATA / "alpaca.jsonl")
    assert examples[1] == {"prompt": "Translate to German.\n\nGood morning", "response": "Guten Morgen"}
    assert examples[2] == {"prompt": "Name a primary colour.", "response": "Red."}  # no input column at all


def _targets(tokenizer, example: dict) -> tuple[list[str], str]:
    """The decoded runs of target tokens, and the whole decoded sequence."""
    ids, labels = example["input_ids"], example["labels"]
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs, tokenizer.decode(ids)


def test_loss_covers_every_assistant_turn_and_nothing_else(tokenizer):
    multi = build_sft_examples(tokenizer, load_task("file", path=DATA / "messages.jsonl"), 512)[0]
    runs, text = _targets(tokenizer, multi)
    assert runs == ["A small assistant.<|im_end|>\n", "4.<|im_end|>\n"]
    assert text == tokenizer.apply_chat_template(load_task("file", path=DATA / "messages.jsonl")[0]["messages"],
                                                 tokenize=False)  # exactly the template's rendering
    sharegpt = build_sft_examples(tokenizer, load_task("file", path=DATA / "sharegpt.jsonl"), 512)
    assert _targets(tokenizer, sharegpt[0])[0] == ["Apple.<|im_end|>\n", "Pear.<|im_end|>\n"]
    assert _targets(tokenizer, sharegpt[1])[1].startswith("<|im_start|>system\nBe kind.<|im_end|>")
    # TRL's conversational prompt/completion: an assistant turn inside the prompt is context
    chat_pc = build_sft_examples(tokenizer, load_task("file", path=DATA / "prompt_completion_chat.jsonl"), 512)
    assert _targets(tokenizer, chat_pc[1])[0] == ["6<|im_end|>\n"]
    # TRL's plain prompt/completion: no template, the completion continues the prompt, then EOS
    plain = build_sft_examples(tokenizer, load_task("file", path=DATA / "prompt_completion.jsonl"), 512)[0]
    assert _targets(tokenizer, plain) == ([" blue." + tokenizer.eos_token], "The sky is blue." + tokenizer.eos_token)
    with pytest.raises(ValueError, match="conversation data needs the tokenizer's chat template"):
        build_sft_examples(tokenizer, load_task("file", path=DATA / "messages.jsonl"), 512, chat=False)


def test_column_mapping_covers_other_files(tmp_path):
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"q": "Say hi", "a": "hi", "id": 3}])
    with pytest.raises(ValueError, match=r"cannot tell its format.*--columns prompt=my_column"):
        load_task("file", path=path)
    assert load_task("file", path=path, columns={"prompt": "q", "response": "a"}) == [
        {"prompt": "Say hi", "response": "hi"}]
    with pytest.raises(ValueError, match=r"option 'columns' names column\(s\) \['answer'\] that data file"):
        load_task("file", path=path, columns={"response": "answer"})


@pytest.mark.parametrize("row, message", [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]},
     r"row 0: field 'conversations' message 1 has from 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "row 0: field 'messages' has no assistant message"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "row 0: field 'messages' message 0 content must be a string"),
    ({"messages": []}, "row 0: field 'messages' must be a non-empty list"),
    ({"instruction": "Do it", "output": "  "}, "row 0: field 'output' must be a non-empty string"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": "a"},
     "row 0: field 'completion' must be a non-empty list of messages"),
])
def test_bad_rows_name_the_file_row_and_field(tmp_path, row, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(ValueError, match=message) as err:
        load_task("file", path=path)
    assert "bad.jsonl" in str(err.value)


def test_unreadable_files_say_why(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty.jsonl' is empty \(0 bytes\)"):
        load_task("file", path=tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", response: "d"}\n')
    with pytest.raises(ValueError, match=r"could not be read as json: line 3 is not valid JSON \(Expecting"):
        load_task("file", path=tmp_path / "bad.jsonl")
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        load_task("file", path=tmp_path / "binary.jsonl")
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(FileNotFoundError, match="does not exist or is not a file"):
        load_task("file", path=tmp_path / "folder.jsonl")


def test_a_training_file_alone_gets_a_seeded_held_out_split(tmp_path):
    rows = [{"instruction": f"Repeat {i}", "output": str(i)} for i in range(30)]
    data = DataConfig(task="file", path=str(_write_jsonl(tmp_path / "a.jsonl", rows)), eval_fraction=0.2)
    train, held = train_examples(data), eval_examples("heldout", data, None)
    assert len(train) == 24 and len(held) == 6
    prompts = {e["prompt"] for e in train}
    assert prompts.isdisjoint(e["prompt"] for e in held) and len(prompts | {e["prompt"] for e in held}) == 30
    assert eval_examples("heldout", data, None) == held  # seeded: the same cut every time
    other = DataConfig(task="file", path=data.path, eval_fraction=0.2, split_seed=1)
    assert {e["prompt"] for e in eval_examples("heldout", other, None)} != {e["prompt"] for e in held}
    everything = DataConfig(task="file", path=data.path, eval_fraction=0.0)
    assert len(train_examples(everything)) == 30
    with pytest.raises(ValueError, match="needs data.eval_path .* or data.eval_fraction > 0"):
        eval_examples("heldout", everything, None)
    with pytest.raises(ValueError, match="holding out 0.01 of 30 distinct prompts leaves 0 for test"):
        train_examples(DataConfig(task="file", path=data.path, eval_fraction=0.01))


def test_conversations_sharing_a_system_prompt_split_by_their_question(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Count to {i}"},
                          {"role": "assistant", "content": " ".join(map(str, range(1, i + 2)))}]} for i in range(10)]
    data = DataConfig(task="file", path=str(_write_jsonl(tmp_path / "chat.jsonl", rows)), eval_fraction=0.2)
    train, held = train_examples(data), eval_examples("heldout", data, None)
    assert len(train) == 8 and len(held) == 2
    assert {e["messages"][1]["content"] for e in train}.isdisjoint(e["messages"][1]["content"] for e in held)


def test_a_bad_training_file_fails_before_anything_is_written(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}] * 5)
    out = tmp_path / "run"
    assert main(["train", "--task", "file", "--path", str(path), "--format", "sharegpt", "--output-dir", str(out)]) == 2
    assert "lacks column(s) ['conversations'] needed by format 'sharegpt'" in capsys.readouterr().err
    assert not out.exists()


def test_heldout_without_a_split_fails_before_training(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(10)])
    out = tmp_path / "run"
    assert main(["train", "--task", "file", "--path", str(path), "--eval-fraction", "0", "--tasks", "heldout",
                 "--output-dir", str(out)]) == 2
    assert "needs data.eval_path (a held-out file) or data.eval_fraction > 0" in capsys.readouterr().err
    assert not out.exists()


def test_tasks_flag_without_value_switches_evaluation_off(capsys):
    import yaml

    smoke = str(Path(__file__).parents[1] / "configs" / "smoke.yaml")
    assert main(["train", "--config", smoke, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["eval"]["tasks"]  # the recipe evaluates
    assert main(["train", "--config", smoke, "--tasks", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["eval"]["tasks"] == []


def test_response_loss_matches_the_models_own_loss(smollm2):
    from dude.evaluate import evaluate_response_loss

    model, tokenizer = smollm2
    examples = load_task("file", path=DATA / "messages.jsonl")
    result = evaluate_response_loss(model, tokenizer, examples, batch_size=2)
    tokenized = build_sft_examples(tokenizer, examples, 1024)
    sums, counts = [], []
    for ex in tokenized:  # one example at a time, no padding: transformers' own mean loss
        labels = torch.tensor([ex["labels"]])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ex["input_ids"]]), labels=labels).loss.item()
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        sums.append(loss * n)
        counts.append(n)
    assert result["tokens"] == sum(counts) and result["n"] == 2
    assert result["loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-4)
    assert result["example_losses"] == pytest.approx([s / c for s, c in zip(sums, counts)], rel=1e-4)


def test_train_on_an_alpaca_file_alone_reports_its_held_out_loss(tmp_path, smollm2_dir, capsys):
    rows = [{"instruction": f"Add {a} and {a + 1}.", "input": "", "output": f"{2 * a + 1}"} for a in range(20)]
    path = _write_jsonl(tmp_path / "alpaca.jsonl", rows)
    model_dir = make_tiny_model_dir(tmp_path / "model", smollm2_dir)
    out = tmp_path / "run"
    assert main(["train", "--name-or-path", str(model_dir), "--task", "file", "--path", str(path),
                 "--eval-fraction", "0.25", "--tasks", "heldout", "--method", "dude", "--adapter.r", "2",
                 "--steps", "2", "--optim-batch-size", "2", "--output-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("format 'alpaca' (instruction, output, optional input) -> 20 instruction examples") == 1
    assert "data: 15 of them for training" in printed
    result = json.loads((out / "eval.json").read_text())["heldout"]
    assert result["n"] == 5 and result["tokens"] > 0 and 0 < result["loss"] < 100
    assert "eval heldout: response loss" in printed


def test_compare_reports_the_response_loss_of_a_text_held_out_set(tmp_path, smollm2_dir, capsys):
    """`dude compare` on an Alpaca file: the table's held-out column is the response loss
    that each run's (and the base model's) eval.json holds."""
    rows = [{"instruction": f"Add {a} and {a + 1}.", "input": "", "output": f"{2 * a + 1}"} for a in range(12)]
    path = _write_jsonl(tmp_path / "alpaca.jsonl", rows)
    model_dir = make_tiny_model_dir(tmp_path / "model", smollm2_dir)
    out = tmp_path / "cmp"
    assert main(["compare", "--name-or-path", str(model_dir), "--task", "file", "--path", str(path),
                 "--eval-fraction", "0.25", "--methods", "lora", "--adapter.r", "2", "--steps", "2", "--lr", "0.01",
                 "--optim-batch-size", "2", "--tasks", "heldout", "--base-tasks", "heldout", "--smooth", "1",
                 "--output-dir", str(out), "--no-progress"]) == 0
    base = json.loads((out / "base" / "eval.json").read_text())["results"]["heldout"]["loss"]
    after = json.loads((out / "lora-seed0" / "eval.json").read_text())["heldout"]["loss"]
    assert f"{base:.3f}" != f"{after:.3f}"  # the column shows the run's loss, not the base's
    table = (out / "compare.md").read_text()
    assert f"held-out loss (base {base:.3f})" in table
    assert table.splitlines()[2].split(" | ")[4] == f"{after:.3f} ({after - base:+.3f})"
    assert json.loads((out / "compare.json").read_text())["methods"]["lora"]["lr"] == 0.01  # --lr: one lr for all
    assert table in capsys.readouterr().out
