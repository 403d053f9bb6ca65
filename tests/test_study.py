"""The paper-claims study v2 (studies/paper_claims): plan, measures, cache/resume, verdicts, report.

The fast tests run the study's plan with a fake runner that writes the files a real run
writes (synthetic numbers); the measures are checked against a direct HF forward on the
real model; the --quick subset itself is behind ``--runslow``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

STUDY_DIR = Path(__file__).resolve().parents[1] / "studies" / "paper_claims"
sys.path.insert(0, str(STUDY_DIR))

from claims import aggregate, compare, paired_noise, steps_to  # noqa: E402
from data import GsmCut, retention_rows  # noqa: E402
from measures import fingerprint  # noqa: E402
from plan import (FULL, NEEDS, Budget, StudyConfig, config_key, data_files, ladder, measure_request, n_train,  # noqa: E402
                  rank_runs_per_method, saved_key, sweep_grid, train_config)
from report import write_report  # noqa: E402
from runner import Study, finished  # noqa: E402

TINY = StudyConfig(
    name="tiny", budget=Budget(cut=GsmCut(train_per=2, val_per=1, id_per=1, ood_per=1), steps=20),
    lr_grid={"lora": [1e-3, 3e-3], "dora": [1e-3, 3e-3], "pissa": [1e-4, 3e-4], "dude": [1e-4, 3e-4]},
    seeds=[0, 1, 2], ranks=[4, 16, 64],
)
BEST = {"lora": 3e-3, "dora": 1e-3, "pissa": 3e-4, "dude": 1e-4}  # the fake's validation minima
ID_LOSS = {"lora": 0.60, "dora": 0.60, "pissa": 0.55, "dude": 0.50}


class FakeRunner:
    """Writes an item's files with numbers from its record: DuDe learns fastest and best,
    forgets as much as the others; the validation minimum is BEST (past a grid edge for DoRA)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, item, out: Path) -> bool:
        self.calls.append({**item.record, "key": item.key, "command": item.command})
        out.mkdir(parents=True, exist_ok=True)
        if item.command == "calib":
            (out / "update_ratio.json").write_text(json.dumps({"ratio": 4.0, "norms": {"lora": 1.0, "pissa": 4.0}}))
            return True
        done = json.loads((out / "measures.json").read_text()) if (out / "measures.json").exists() else {}
        m, seed = item.record.get("method", "base"), item.record.get("seed", 0)
        if item.command == "train" and not (out / "summary.json").exists():
            rate = {"lora": 0.05, "dora": 0.05, "pissa": 0.07, "dude": 0.09}[m]
            lines = [{"step": s, "loss": 2.0 * math.exp(-rate * s) + 0.01 * seed} for s in range(1, 21)]
            (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
            (out / "summary.json").write_text(json.dumps({"wall_time_s": 10.0, "peak_memory_mb": 900.0,
                                                          "trainable_parameters": 1000}))
        for name in item.request["measures"]:
            if name == "val":
                done[name] = {"loss": 1.0 + abs(math.log(item.record["lr"] / BEST[m])) if m != "base" else 2.0}
            elif name == "accuracy":
                acc = {"base": 0.01, "lora": 0.05, "dora": 0.05, "pissa": 0.06, "dude": 0.10}[m] + 0.005 * seed
                done[name] = {"accuracy": acc, "n": 420}
            else:
                level = {"id": ID_LOSS.get(m, 1.0), "ood": ID_LOSS.get(m, 1.0) + 0.3, "retention": 1.5}[name]
                done[name] = {"loss": level + 0.002 * seed + (0.0 if m == "base" else 0.1 * (name == "retention"))}
        for name in item.request["measures"]:
            done[name]["fingerprint"] = fingerprint(item.request, name)
        (out / "measures.json").write_text(json.dumps(done))
        (out / "record.json").write_text(json.dumps(item.record))
        return True


def test_ladder_and_grid_extension_past_an_edge():
    assert [ladder(1e-3, 1), ladder(3e-3, 1), ladder(1e-4, -1), ladder(3e-4, -2)] == [3e-3, 1e-2, 3e-5, 3e-5]
    bowl = lambda lr: (math.log10(lr) - math.log10(3e-5)) ** 2  # noqa: E731  minimum below the grid
    grid, settled = sweep_grid([1e-4, 3e-4, 1e-3], bowl, max_extensions=3)
    assert settled and grid == [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]  # two rungs down, then the best is inside
    known = {1e-4: 1.0, 3e-4: 2.0, 1e-3: 3.0}
    assert sweep_grid([1e-4, 3e-4, 1e-3], known.get, 3) == ([3e-5, 1e-4, 3e-4, 1e-3], False)  # 3e-5 not run yet
    assert sweep_grid([1e-4, 3e-4, 1e-3], known.get, 0) == ([1e-4, 3e-4, 1e-3], True)  # no extension left
    diverged = {1e-3: 1.0, 3e-3: 0.9, 1e-2: math.inf}.get  # the rung past the top edge blew up
    assert sweep_grid([1e-3, 3e-3], diverged, 3) == ([1e-3, 3e-3, 1e-2], True)


def test_full_budget_covers_an_epoch_and_no_answer_is_cut(tmp_path, smollm2):
    from dude.data import build_sft_examples

    from measures import read_jsonl

    _, tokenizer = smollm2
    files = data_files(FULL, tmp_path)
    rows = {k: read_jsonl(p) for k, p in files.items()}
    b = FULL.budget
    assert train_config(FULL, "dude", 1e-4, 0, 16, tmp_path).data.eval_fraction == 0.0  # every row is trained on
    assert b.train_steps(n_train(FULL, tmp_path)) * b.batch_size >= len(rows["train"]) == 210  # >= 1 epoch
    assert len(rows["id"]) >= 400 and len(rows["ood"]) == 90 and len(rows["val"]) == 70
    assert len(rows["retention"]) == 282
    questions = [{r["question"] for r in rows[k]} for k in ("train", "val", "id", "ood")]
    assert sum(map(len, questions)) == len(set().union(*questions))  # disjoint sets
    def longest(name: str) -> int:
        return max(len(e["input_ids"]) for e in build_sft_examples(tokenizer, rows[name], 10 ** 6))

    assert max(longest(k) for k in ("train", "val", "id", "ood")) <= b.max_length
    assert longest("retention") <= b.retention_max_length
    assert max(len(tokenizer(r["answer"])["input_ids"]) for r in rows["id"]) < b.max_new_tokens


def test_ood_templates_are_never_trained_on(tmp_path):
    from dude.data.gsm_symbolic import gsm_symbolic

    from data import gsm_parts

    parts = gsm_parts(GsmCut())
    held_out = {r["question"] for r in gsm_symbolic("test")}
    assert {r["question"] for r in parts["ood"]} <= held_out
    assert not held_out & {r["question"] for k in ("train", "val", "id") for r in parts[k]}
    assert {r["template_id"] for r in parts["id"]} == {r["template_id"] for r in parts["train"]}


def test_retention_text_is_the_mmlu_explanations():
    rows = retention_rows()
    assert len(rows) == 282
    assert all(r["response"].startswith("Let's think step by step.") and "The answer is" in r["response"] for r in rows)
    assert rows[0]["prompt"].startswith("The following is a multiple choice question about abstract algebra")


def test_response_loss_matches_a_direct_hf_forward(smollm2):
    """Token-weighted response loss over a padded, length-sorted batch == HF's own loss with
    labels, example by example, weighted by each example's response tokens."""
    import torch

    from dude.data import build_sft_examples

    from valloss import response_loss

    model, tokenizer = smollm2
    rows = [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
            {"prompt": "Name a colour.", "response": "Blue, the colour of a clear sky at noon."},
            {"question": "What is 12 times 3?", "answer": "12 * 3 = 36\n#### 36"}]
    total = tokens = 0.0
    for ex in build_sft_examples(tokenizer, rows, 10 ** 6):
        labels = torch.tensor([ex["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += model(input_ids=torch.tensor([ex["input_ids"]]), labels=labels).loss.item() * n
        tokens += n
    got = response_loss(model, tokenizer, rows, max_length=256, batch_size=2)
    assert got["tokens"] == tokens and got["examples"] == 3
    # 7e-5 apart: dude.evaluate.loss takes the cross-entropy over (batch, vocab, T) logits, which on CPU
    # sums less exactly than HF's flat (tokens, vocab) one (float64 agrees with the flat one to 1e-5);
    # a wrong mask (one prompt token more or less) moves the loss by > 1%
    assert got["loss"] == pytest.approx(total / tokens, rel=3e-4)
    with pytest.raises(ValueError, match="answer would be cut"):
        response_loss(model, tokenizer, rows, max_length=40)


def test_lora_first_step_update_is_lr_times_sign_of_gradient_times_a(smollm2):
    """The control's measured update against its closed form: with B = 0, AdamW's first step
    is dB = -lr g_B / (|g_B| + eps) and dA = 0 (g_A = 0), so ||dW|| = s ||dB A|| per layer."""
    import torch

    import dude
    from dude.data import build_sft_examples, collate_sft

    from control import first_step_update
    from plan import adapter_config

    model, tokenizer = smollm2
    rows = [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
            {"question": "What is 12 times 3?", "answer": "12 * 3 = 36\n#### 36"}]
    batch = collate_sft(build_sft_examples(tokenizer, rows, 256), tokenizer.pad_token_id)
    got = first_step_update("lora", 4, 0, batch, lr=1e-5)
    dude.apply(model, adapter_config("lora", 4, 0))
    model.train()
    model(**batch).loss.backward()
    expected = 0.0
    with torch.no_grad():
        for layer in dude.adapter_layers(model).values():
            step_b = -1e-5 * layer.lora_B.grad / (layer.lora_B.grad.abs() + 1e-8)  # (out, r): Adam's first step
            expected += float(torch.linalg.norm(layer.scaling * step_b @ layer.lora_A))
    assert got > 0 and got == pytest.approx(expected, rel=1e-3)


def test_config_key_is_the_resolved_config(tmp_path):
    a = train_config(TINY, "dude", 1e-4, 0, 16, tmp_path)
    moved = dataclasses.replace(a, run=dataclasses.replace(a.run, output_dir="elsewhere", overwrite=True))
    assert config_key(a) == config_key(moved)  # where it is written does not change the result
    lora = train_config(TINY, "lora", 1e-3, 0, 16, tmp_path)
    other_svd = dataclasses.replace(lora.adapter, svd_niter=3)
    assert config_key(dataclasses.replace(lora, adapter=other_svd)) == config_key(lora)  # LoRA does no SVD
    assert config_key(dataclasses.replace(a, adapter=dataclasses.replace(a.adapter, svd_niter=3))) != config_key(a)
    assert len({config_key(a), config_key(train_config(TINY, "dude", 3e-4, 0, 16, tmp_path)),
                config_key(train_config(TINY, "dude", 1e-4, 1, 16, tmp_path))}) == 3
    import yaml

    from dude.train.options import to_dict

    (tmp_path / "run").mkdir()  # the key survives the YAML round trip of run-config.yaml (alpha 16 vs 16.0)
    (tmp_path / "run" / "run-config.yaml").write_text(yaml.safe_dump(to_dict(a), sort_keys=False))
    assert saved_key(tmp_path / "run") == config_key(a)
    assert config_key(train_config(TINY, "dude", 1e-4, 0, 16, tmp_path / "moved")) == config_key(a)
    before = config_key(a)
    Path(a.data.path).write_text(Path(a.data.path).read_text()[:-300] + "\n")
    assert config_key(a) != before  # the data file's content is part of the key


def _total(study: StudyConfig) -> int:
    """Distinct items of the fake study: base, calib, sweep (each grid gains a rung), main
    seeds 1-2, control seeds, rank runs."""
    sweep = sum(len(g) + 1 for g in study.lr_grid.values())  # each fake minimum is one rung past an edge
    return (2 + sweep + 4 * (len(study.seeds) - 1) + len(study.seeds)
            + len(study.rank_methods) * rank_runs_per_method(study))


def test_study_runs_once_resumes_and_reports(tmp_path):
    fake = FakeRunner()
    study = Study(TINY, tmp_path, runner=fake, log=lambda m: None)
    study.run(max_runs=5)  # an interrupted sitting: base, calib, 3 sweep runs
    assert len(fake.calls) == 5
    write_report(study, tmp_path / "REPORT.md")
    text = (tmp_path / "REPORT.md").read_text()
    assert "Status: incomplete" in text and "wait for this method's lr sweep" in text

    study.run()  # the next sitting finishes the rest, without redoing the first five
    assert len(fake.calls) == len({(c["key"], c["phase"]) for c in fake.calls})  # nothing done twice
    assert len({c["key"] for c in fake.calls}) == _total(TINY)
    assert study.best_lrs() == BEST
    assert study.sweep("dora")[0] == [3e-4, 1e-3, 3e-3]  # 1e-3 won at the lower edge: one rung added
    mains = [c for c in fake.calls if c["phase"] == "main"]
    assert {c["lr"] for c in mains if c["method"] == "lora"} == {BEST["lora"]} and len(mains) == 12
    seed0 = next(c for c in mains if c["method"] == "dude" and c["seed"] == 0)
    assert any(c["key"] == seed0["key"] and c["phase"] == "sweep" for c in fake.calls)  # the sweep run, measured more
    controls = [c for c in fake.calls if c["phase"] == "control"]
    assert {c["lr"] for c in controls} == {4.0 * BEST["pissa"]} and {c["method"] for c in controls} == {"lora"}

    again = Study(TINY, tmp_path, runner=fake, log=lambda m: None)
    n = len(fake.calls)
    again.run()
    assert len(fake.calls) == n and again.ran == 0  # all cached
    victim = next(c for c in fake.calls if c["phase"] == "rank")  # a run killed before its measures
    (tmp_path / "runs" / victim["key"] / "measures.json").unlink()
    again.run()
    assert fake.calls[-1]["key"] == victim["key"] and len(fake.calls) == n + 1

    main = next(i for i in again.plan() if i.phase == "main")
    assert finished(tmp_path / "runs" / main.key, main)
    fewer = dataclasses.replace(main, request=dict(main.request, limits={"retention": 100}))
    assert not finished(tmp_path / "runs" / main.key, fewer)  # another eval setting: measured again, not mixed in

    write_report(again, tmp_path / "REPORT.md")
    text = (tmp_path / "REPORT.md").read_text()
    assert "Status: complete" in text and (tmp_path / "plots" / "tiny-gsm_symbolic-loss.png").stat().st_size > 5000
    row = lambda start: next(x for x in text.splitlines() if x.startswith(start))  # noqa: E731
    assert "**holds**" in row("| Lower held-out loss in distribution") and "dude 0.5020 ± 0.0020" in row(
        "| Lower held-out loss in distribution")
    assert "**holds**" in row("| Converges faster than LoRA")
    assert "**does not hold**" in row("| Forgets less")  # the same rise for every method: no gain
    assert "**holds**" in row("| Higher greedy accuracy")
    assert "**holds**" in row("| PiSSA's difference from LoRA")  # the fake's LoRA ignores its lr
    assert "k = **4**" in text and "| lora @ matched lr (control) | 0.0012 | 3 |" in text


def test_rank_lr_rungs_add_runs_and_the_validation_loss_picks_the_one_that_counts(tmp_path):
    """An lr tuned at r=16 need not suit r=64: ``rank_lr_rungs`` trains each rank method one
    rung lower there too, and the rank table and the rank verdict take the run of lower
    validation loss, whichever lr it has."""
    config = dataclasses.replace(TINY, rank_lr_rungs={64: (-1,)})

    class LowerAt64(FakeRunner):  # at r=64 the fake's best lr is one rung below its r=16 best
        def __call__(self, item, out: Path) -> bool:
            ok = super().__call__(item, out)
            if item.record.get("r") == 64:
                done = json.loads((out / "measures.json").read_text())
                lower = item.record["lr"] < BEST[item.record["method"]]
                done["val"]["loss"], done["id"]["loss"] = (0.9, 0.40) if lower else (1.1, 0.70)
                (out / "measures.json").write_text(json.dumps(done))
            return ok

    fake = LowerAt64()
    study = Study(config, tmp_path, runner=fake, log=lambda m: None)
    study.run()
    assert len({c["key"] for c in fake.calls}) == _total(config) == _total(TINY) + 4
    at_64 = {(c["method"], c["lr"]) for c in fake.calls if c["phase"] == "rank" and c["r"] == 64}
    assert at_64 == {(m, lr) for m in BEST for lr in (BEST[m], ladder(BEST[m], -1))}

    write_report(study, tmp_path / "REPORT.md")
    text = (tmp_path / "REPORT.md").read_text()
    row = lambda start: next(x for x in text.splitlines() if x.startswith(start))  # noqa: E731
    lower = ladder(BEST["dude"], -1)
    assert row("| dude | 64 |") == f"| dude | 64 | {lower:g}: 0.9000 / 0.4000* | {BEST['dude']:g}: 1.1000 / 0.7000 |"
    assert row("| dude | 0.5000 / ").endswith("| 0.4000 / - / - |")  # the rank table: r=64's chosen run
    assert "dude 0.1000" in row("| More robust across ranks")  # range 0.50 - 0.40, not 0.70 - 0.50
    assert row("DuDe - LoRA").startswith("DuDe - LoRA, in-distribution loss, at each rank: r=4 -0.1000, r=16 -0.1000, "
                                         "r=64 +0.0000 ")


def test_parallel_workers_respect_the_sweep(tmp_path):
    """Two workers (``--jobs 2``) never run one folder twice at once, and a main, control or
    rank run of a method starts only after its sweep has settled."""
    import threading
    import time

    fake, order, lock = FakeRunner(), [], threading.Lock()

    def slow(item, out):
        time.sleep(0.01 if item.phase == "sweep" else 0.002)  # let the workers overlap
        with lock:
            order.append((item.phase, item.record.get("method"), "start"))
        ok = fake(item, out)
        with lock:
            order.append((item.phase, item.record.get("method"), "end"))
        return ok

    study = Study(TINY, tmp_path, runner=slow, log=lambda m: None)
    study.run(jobs=2)
    assert len({c["key"] for c in fake.calls}) == _total(TINY)
    for method in TINY.lr_grid:
        last_sweep_end = max(i for i, e in enumerate(order) if e == ("sweep", method, "end"))
        first_later = min(i for i, e in enumerate(order) if e[1] == method and e[0] in ("main", "rank"))
        assert first_later > last_sweep_end


def test_planning_never_reads_a_folder_being_written(tmp_path, monkeypatch):
    """The cause of a JSONDecodeError seen in a worker thread: planning (another worker) read
    the measures.json of an item a worker was still writing. A writer that leaves the file
    empty for a while (as ``write_text`` does between truncating and writing) must not be seen."""
    import threading
    import time

    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    write_text = Path.write_text

    def slow_write(self, data, *args, **kwargs):
        if self.name == "measures.json":
            write_text(self, "")
            time.sleep(0.003)
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", slow_write)
    fake = FakeRunner()

    def runner(item, out):
        time.sleep(0.01 if item.phase == "sweep" else 0.002)
        return fake(item, out)

    Study(TINY, tmp_path, runner=runner, log=lambda m: None).run(jobs=2)
    assert errors == [] and len({c["key"] for c in fake.calls}) == _total(TINY)


def test_verdict_rule():
    assert compare((0.5, 0.01, 3), (0.3, 0.01, 3), True)[0] == "holds"
    assert compare((0.3, 0.01, 3), (0.5, 0.01, 3), True)[0] == "does not hold"
    assert compare((0.31, 0.05, 3), (0.30, 0.05, 3), True)[0] == "inconclusive"
    # equal within a tight noise band, and the band excludes a 1% gain: no gain worth the name
    assert compare((0.500, 0.001, 3), (0.501, 0.001, 3), False, margin=0.005)[0] == "does not hold"
    assert compare((0.500, 0.001, 3), (0.501, 0.001, 3), False, margin=0.0)[0] == "inconclusive"
    # one seed each: the binomial error of 60 problems decides; 8% vs 5% is noise
    assert compare((0.08, None, 1), (0.05, None, 1), True, n_items=60)[0] == "inconclusive"
    assert compare((0.2, None, 1), (0.3, None, 1), False)[0] == "inconclusive"  # no noise estimate
    # 0 of 2 correct each: no evidence either way (a plain binomial error of 0 would say "does not hold")
    assert compare((0.0, None, 1), (0.0, None, 1), True, n_items=2, margin=0.01)[0] == "inconclusive"
    run = {"steps": [1, 2, 3, 4, 5, 6], "loss": [1.0] * 6}
    assert steps_to(run, 1.0) == 1 and steps_to(run, 0.5) == 7  # not reached: censored at steps + 1


def test_paired_rule_cancels_the_seeds_own_luck():
    # seeds differ a lot (0.40, 0.50, 0.60) but A is 0.02 below B on every one of them
    b = {0: 0.42, 1: 0.52, 2: 0.62}
    a = {0: 0.40, 1: 0.50, 2: 0.605}
    stat = lambda d: (statistics.fmean(d.values()), statistics.stdev(d.values()), len(d))  # noqa: E731
    assert compare(stat(a), stat(b), False)[0] == "inconclusive"  # unpaired: the seeds' spread hides it
    band = paired_noise(a, b)
    assert band == pytest.approx(2 * statistics.stdev([-0.02, -0.02, -0.015]) / math.sqrt(3))
    assert compare(stat(a), stat(b), False, band=band)[0] == "holds"
    assert paired_noise(a, {0: 0.42, 1: 0.52}) is None and paired_noise({0: 0.4}, {0: 0.5}) is None  # no pairs
    # aggregate keeps each run's value under its seed, so the verdict table can pair them
    runs = [{"seed": s, "lr": 1e-3, "loss": [1.0, 0.5], "steps": [1, 2], "diverged": False, "summary": None,
             "measures": {"id": {"loss": v}, "retention": {"loss": v + 1}}} for s, v in a.items()]
    agg = aggregate(runs, {"retention": {"loss": 1.0}}, 0.75)  # the trailing mean reaches 0.75 at step 2
    assert agg["by_seed"]["id"] == a and agg["by_seed"]["forgetting"] == pytest.approx(a)
    assert agg["by_seed"]["steps_to_target"] == {0: 2, 1: 2, 2: 2}


def test_every_phase_names_its_measures(tmp_path):
    assert set(NEEDS) == {"base", "sweep", "main", "control", "rank"}
    assert "accuracy" in NEEDS["main"] and NEEDS["sweep"] == ("val",)
    study = dataclasses.replace(FULL, budget=dataclasses.replace(FULL.budget, cut=TINY.budget.cut))
    requested = {seed: measure_request(study, tmp_path, "main", seed)["measures"] for seed in study.seeds}
    assert requested == {0: ["id", "ood", "retention", "accuracy"], 1: ["id", "ood", "retention"],
                         2: ["id", "ood", "retention"]}  # FULL generates on seed 0 only


@pytest.mark.slow
def test_quick_subset_runs_and_resumes(tmp_path):
    """The --quick subset end to end on the real model (~30 min on 2 busy cores)."""
    run = [sys.executable, str(STUDY_DIR / "run.py"), "--quick", "--root", str(tmp_path)]
    first = subprocess.run(run, capture_output=True, text=True, timeout=3600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = (tmp_path / "REPORT-quick.md").read_text()
    assert "Status: complete" in report and "## Verdicts" in report
    second = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "ran 0, failed 0" in second.stdout


def test_a_killed_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """A run folder with a checkpoint is continued (``dude train --resume``, bit-exact),
    one without is started over; neither option changes the run's key."""
    import runner
    import yaml

    study = Study(TINY, tmp_path, log=lambda m: None)
    item = study._train_item("sweep", "dude", 1e-4, 0, 16)
    seen = []

    def fake_python(args, log):
        seen.append(yaml.safe_load(Path(args[-1]).read_text())["run"])
        log.write_text("killed\n")
        return 1, 0.0  # "killed": nothing else happens

    monkeypatch.setattr(runner, "_python", fake_python)
    out = tmp_path / "runs" / item.key
    runner.execute(item, out)
    assert seen[-1]["overwrite"] and not seen[-1]["resume"] and seen[-1]["save_every"] == runner.SAVE_EVERY
    (out / "config.yaml").write_text("{}")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-000015.pt").write_bytes(b"")
    runner.execute(item, out)
    assert seen[-1]["resume"] and not seen[-1]["overwrite"]
    assert saved_key(out) == item.key


def test_a_finished_run_without_its_weights_trains_again(tmp_path, monkeypatch):
    """The adapter weights are gitignored: in a fresh clone, a finished sweep run that its
    main phase must measure further is trained again (bit-reproducible), never measured as
    the base model."""
    import runner
    import yaml

    study = Study(TINY, tmp_path, log=lambda m: None)
    item = study._train_item("main", "dude", 1e-4, 0, 16)
    out = tmp_path / "runs" / item.key
    out.mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    (out / "adapter_config.json").write_text("{}")
    calls = []

    def fake_python(args, log):
        calls.append(args)
        log.write_text("stopped\n")
        return 1, 0.0

    monkeypatch.setattr(runner, "_python", fake_python)
    runner.execute(item, out)
    assert calls[-1][:3] == ["-m", "dude.cli", "train"]  # trained again: no adapter_model.safetensors
    assert yaml.safe_load(Path(calls[-1][-1]).read_text())["run"]["overwrite"]
    (out / "adapter_model.safetensors").write_bytes(b"")
    runner.execute(item, out)
    assert calls[-1][0].endswith("measures.py")  # weights here: straight to the measures

    import measures

    (out / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="without its adapter"):
        measures.load_model(out)
