"""Evaluate a model on the eval sets of ``eval.tasks``: math by exact match of greedy
answers and/or the loss on the worked solution (``eval.math_scores``), multiple choice by
the log-likelihood of the answer letter, text (instruction or conversation) by the loss
on the response tokens (``dude.evaluate``)."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..data import task_kind
from ..data.prompts import use_chat
from .config import DataConfig, EvalConfig
from .tasks import eval_examples


def evaluate_tasks(cfg: EvalConfig, data: DataConfig, model: Any, tokenizer: Any,
                   log: bool = True) -> dict[str, Any]:
    """``{task: {"accuracy", "n", "correct", "seconds", ...}}``, predictions included; text
    sets, and math sets scored by loss, give ``{"loss", "perplexity", "n", "tokens", ...}``
    (both sets of fields for a math set scored both ways)."""
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    try:
        for name in cfg.tasks:
            examples = eval_examples(name, data, cfg.mmlu_limit if name.startswith("mmlu") else cfg.limit)
            start = time.perf_counter()
            with torch.no_grad():
                result = _score_set(cfg, data, name, examples, model, tokenizer)
            result["seconds"] = round(time.perf_counter() - start, 2)
            results[name] = result
            if log:
                print(f"eval {name}: {_score(result)} in {result['seconds']:.0f} s")
    finally:
        model.train(was_training)
    return results


def _score_set(cfg: EvalConfig, data: DataConfig, name: str, examples: list[dict], model: Any,
               tokenizer: Any) -> dict[str, Any]:
    """One eval set's result; a math set scored both ways holds both results' fields."""
    from ..evaluate import evaluate_math, evaluate_multiple_choice, evaluate_response_loss

    kind = task_kind(examples)
    if kind == "multiple_choice":
        # MMLU is scored as plain text; a trained task in the format it was trained in
        chat = False if name in ("mmlu", "mmlu_dev") else use_chat(tokenizer, data.chat)
        return evaluate_multiple_choice(model, tokenizer, examples, batch_size=cfg.batch_size, chat=chat)
    result: dict[str, Any] = {}
    if kind == "math" and "accuracy" in cfg.math_scores:
        result = evaluate_math(model, tokenizer, examples, batch_size=cfg.batch_size,
                               max_new_tokens=cfg.max_new_tokens, chat=data.chat)
    if kind != "math" or "loss" in cfg.math_scores:
        loss = evaluate_response_loss(model, tokenizer, examples, batch_size=cfg.batch_size, chat=data.chat,
                                      max_length=cfg.loss_max_length or data.max_length)
        result = {**loss, **result}
    return result


def _score(result: dict[str, Any]) -> str:
    scores = []
    if "accuracy" in result:
        scores.append(f"accuracy {result['accuracy']:.3f} ({result['correct']}/{result['n']})")
    if "loss" in result:
        scores.append(f"response loss {result['loss']:.4f} (perplexity {result['perplexity']:.2f}, "
                      f"{result['tokens']} tokens)")
    return ", ".join(scores)


def summary_table(results: dict[str, Any]) -> str:
    """A short plain-text table: accuracy, or the response loss of a text set."""
    rows = [("task", "score", "n")]
    rows += [(k, _score(v), str(v["n"])) for k, v in results.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
