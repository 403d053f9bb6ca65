"""How an example becomes text: one prompt format per kind, shared by training and evaluation.

Five kinds of example, told apart by their fields:

- math:            ``{"question": str, "answer": str}`` (GSM8K format, ending ``#### n``)
- multiple choice: ``{"question": str, "choices": list[str], "answer": int}``
- instruction:     ``{"prompt": str, "response": str}``
- completion:      ``{"prompt": str, "completion": str}``: plain text continued as it
                   stands (TRL's standard prompt-completion), never in a chat template
- conversation:    ``{"messages": [{"role", "content"}], "prompt_turns": int}``: rendered by
                   the chat template only; the assistant turns from ``prompt_turns`` on are
                   the targets (``dude.data.sft``)

``prompt_and_response`` gives the user-side text and the target text; ``render_prompt``
wraps the prompt in the tokenizer's chat template when asked (and when it has one), so
a model is evaluated in the same format it was trained in.
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = ["LETTERS", "MATH_INSTRUCTION", "Kind", "encode_prompt", "example_kind", "mc_prompt",
           "prompt_and_response", "render_prompt", "response_prefix", "use_chat"]

Kind = Literal["math", "multiple_choice", "instruction", "completion", "conversation"]
LETTERS = "ABCDEFGHIJ"
MATH_INSTRUCTION = ("Solve the math word problem step by step. "
                    "End with a line '#### <number>' giving the final answer.")


def example_kind(example: dict) -> Kind:
    """Which kind an example is, from its fields (see the module docstring)."""
    if "messages" in example:
        return "conversation"
    if "choices" in example:
        return "multiple_choice"
    if "question" in example and "answer" in example:
        return "math"
    if "prompt" in example and "response" in example:
        return "instruction"
    if "prompt" in example and "completion" in example:
        return "completion"
    raise ValueError(f"example has fields {sorted(example)}; expected question/answer (math), "
                     "question/choices/answer (multiple choice), prompt/response (instruction), "
                     "prompt/completion or messages")


def mc_prompt(example: dict, subject: str | None = None) -> str:
    """The usual MMLU prompt: question, lettered choices, then ``Answer:``."""
    choices = example["choices"]
    if len(choices) > len(LETTERS):
        raise ValueError(f"multiple-choice example has {len(choices)} choices; at most {len(LETTERS)}")
    header = ""
    if subject:
        header = f"The following is a multiple choice question about {subject.replace('_', ' ')}.\n\n"
    lines = [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return header + example["question"] + "\n" + "\n".join(lines) + "\nAnswer:"


def prompt_and_response(example: dict) -> tuple[str, str]:
    """The prompt text and the target response text of an example (no chat template yet).

    Multiple choice targets the answer letter, the quantity the evaluation scores.
    """
    kind = example_kind(example)
    if kind == "conversation":
        raise ValueError("a conversation has no single prompt and response; it is rendered by the chat template")
    if kind == "completion":
        return example["prompt"], example["completion"]
    if kind == "math":
        return f"{MATH_INSTRUCTION}\n\n{example['question']}", example["answer"]
    if kind == "multiple_choice":
        return mc_prompt(example, example.get("subject")), LETTERS[int(example["answer"])]
    return example["prompt"], example["response"]


def use_chat(tokenizer: Any, chat: bool | None) -> bool:
    """Resolve the ``chat`` option: ``None`` means "when the tokenizer has a chat template"."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ValueError("chat=True but the tokenizer has no chat template")
    return has_template if chat is None else chat


def render_prompt(tokenizer: Any, prompt: str, chat: bool) -> str:
    """The text the model sees before its response.

    With ``chat``: the chat template around one user message, with the generation
    prompt (the assistant turn opened). Without: the prompt, and for plain text a
    space is expected before the response (``"Answer: B"``).
    """
    if not chat:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def response_prefix(chat: bool) -> str:
    """Separator between rendered prompt and response: none in a chat turn, else a space."""
    return "" if chat else " "


def encode_prompt(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """Token ids of a rendered prompt: a chat template already holds its special tokens."""
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]
