"""Typed configs of ``dude train`` / ``eval`` / ``export``, one dataclass per YAML section.

Each section validates itself in ``__post_init__`` with errors that name the option; the
same classes give the Python API, the YAML recipes in ``configs/`` and the CLI flags
(``options.py``). The adapter section is ``dude.AdapterConfig`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import AdapterConfig
from .options import opt

DTYPES = ("float32", "bfloat16", "float16")
EVAL_ALIASES = ("heldout", "heldout_variants", "gsm_original", "mmlu")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _positive(section: str, **values: float) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"{section}.{name} must be > 0, got {value!r}")


@dataclass
class ModelConfig:
    name_or_path: str | None = opt(None, "local transformers model folder; empty: the built-in SmolLM2-135M-Instruct")
    dtype: str = opt("float32", f"parameter dtype, one of {DTYPES}")

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")


@dataclass
class DataConfig:
    task: str = opt("gsm_symbolic", "training task: gsm_symbolic (shipped), or file (your data: data.path)")
    path: str | None = opt(None, "task 'file': JSON/JSONL/parquet training file")
    eval_path: str | None = opt(None, "task 'file': held-out file of the same format (eval task 'heldout')")
    eval_fraction: float = opt(0.1, "task 'file' without eval_path: hold out this share of the file, seeded by "
                                    "split_seed, as eval set 'heldout' (0: train on every row)")
    format: str | None = opt(None, "task 'file': messages, sharegpt, prompt_completion, alpaca, metamath, "
                                   "multiple_choice, math or instruction (empty: from the columns)")
    columns: dict[str, str] = opt({}, "task 'file': rename the file's columns first, FIELD=COLUMN "
                                      "(e.g. prompt=question_text response=answer_text)")
    max_length: int = opt(256, "tokens per training example; longer ones are truncated (with a counted warning)")
    limit: int | None = opt(None, "use at most this many training examples (empty: all)")
    split_seed: int = opt(0, "seed of the task's train/held-out split")
    chat: bool | None = opt(None, "wrap prompts in the chat template (empty: when the tokenizer has one)")

    def __post_init__(self) -> None:
        from ..data import FILE_FORMATS, TASKS, removed_task

        if removed_task(self.task):
            raise ValueError(f"data.task: {removed_task(self.task)}")
        if self.task not in TASKS:
            raise ValueError(f"data.task must be one of {list(TASKS)}, got {self.task!r}")
        if self.task == "file" and not self.path:
            raise ValueError("data.task 'file' needs data.path (a JSON, JSONL or parquet file)")
        if self.task != "file" and (self.path or self.eval_path):
            raise ValueError(f"data.path / data.eval_path are for data.task 'file', not {self.task!r}")
        if self.format is not None and self.format not in FILE_FORMATS:
            raise ValueError(f"data.format must be one of {list(FILE_FORMATS)}, got {self.format!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.columns and self.task != "file":
            raise ValueError(f"data.columns is for data.task 'file', not {self.task!r}")
        _positive("data", limit=self.limit)
        if self.max_length < 2:
            raise ValueError(f"data.max_length must be at least 2 tokens, got {self.max_length}")


@dataclass
class OptimConfig:
    steps: int = opt(100, "optimizer steps")
    lr: float = opt(2e-4, "peak learning rate (AdamW)")
    batch_size: int = opt(4, "examples per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    warmup_ratio: float = opt(0.1, "linear warmup over this fraction of the steps, then cosine decay")
    min_lr_ratio: float = opt(0.0, "final lr as a fraction of the peak")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float | None = opt(1.0, "clip the gradient norm to this (empty: no clipping)")

    def __post_init__(self) -> None:
        _positive("optim", steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                  grad_accum=self.grad_accum, max_grad_norm=self.max_grad_norm)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_ratio * self.steps)


@dataclass
class RunConfig:
    output_dir: str = opt("runs/train", "where the adapter, metrics, plots and checkpoints go")
    seed: int = opt(0, "seed of the data order and dropout")
    save_every: int = opt(0, "write a resumable checkpoint every N steps (0: none)")
    keep_checkpoints: int = opt(2, "keep the newest N checkpoints (0: all)")
    log_every: int = opt(1, "append to metrics.jsonl every N steps")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (less memory, ~30% slower)")
    compile: bool = opt(False, "torch.compile the model (each block with gradient checkpointing or fsdp); "
                               "the first step compiles (30-100 s on SmolLM2 on CPU)")
    precision: str = opt("auto", f"one of {PRECISIONS}; auto: bf16 autocast on GPU, fp32 on CPU")
    device: str = opt("auto", "auto, cpu or cuda")
    strategy: str = opt("ddp", "multi-process strategy under torchrun: ddp, or fsdp (FSDP2: shards the base too)")
    resume: bool = opt(False, "continue the run in output_dir from its newest checkpoint")
    overwrite: bool = opt(False, "replace the run in output_dir")
    progress: bool = opt(True, "show a progress bar")
    # str and None too: `report_to: none` in YAML, `--report-to none` (the flag parser reads none as null)
    report_to: list[str | None] | str | None = opt([], "experiment trackers to log to, as transformers' report_to: "
                                                       "tensorboard, wandb, mlflow, trackio (several allowed), "
                                                       "all (those installed) or none")
    run_name: str | None = opt(None, "the run's name in the trackers (empty: the output folder's name)")
    project: str | None = opt(None, "W&B project, MLflow experiment, trackio project (empty: $WANDB_PROJECT, "
                                    "$MLFLOW_EXPERIMENT_NAME, else dude)")

    def __post_init__(self) -> None:
        if self.save_every < 0 or self.keep_checkpoints < 0:
            raise ValueError("run.save_every and run.keep_checkpoints must be >= 0")
        _positive("run", log_every=self.log_every)
        if self.precision not in PRECISIONS:
            raise ValueError(f"run.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"run.device must be auto, cpu or cuda, got {self.device!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"run.strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.resume and self.overwrite:
            raise ValueError("run.resume and run.overwrite exclude each other: pick one")
        self.report_to = _trackers(self.report_to)


def _trackers(report_to: list[str | None] | str | None) -> list[str]:
    """``run.report_to`` as a list of tracker names (``none`` and null: none; ``all`` alone)."""
    from .trackers import NAMES

    names = [n for n in ([report_to] if not isinstance(report_to, list) else report_to) if n not in (None, "none")]
    bad = [n for n in names if n not in (*NAMES, "all")]
    if bad:
        raise ValueError(f"run.report_to: unknown tracker(s) {bad}; use {', '.join(NAMES)}, all or none")
    if "all" in names and len(names) > 1:
        raise ValueError(f"run.report_to: 'all' already names every installed tracker, got {names}")
    return list(dict.fromkeys(names))


@dataclass
class EvalConfig:
    tasks: list[str] = opt([], "after training evaluate on: heldout (the task's held-out split; gsm_symbolic: "
                               "templates never trained on), heldout_variants (gsm_symbolic: new variants of "
                               "the trained templates), mmlu, mmlu_explanations, gsm_original, file:<path> "
                               "(any data file), or a task name; the flag with no value evaluates nothing")
    math_scores: list[str] = opt(["accuracy"], "how math sets are scored: accuracy (exact match of greedy "
                                               "answers), loss (response loss of the worked solution, no "
                                               "generation), or both")
    loss_max_length: int | None = opt(None, "tokens per example of loss-scored sets; longer ones are cut "
                                       "(empty: data.max_length)")
    limit: int | None = opt(None, "at most this many examples per eval set other than the MMLU ones (empty: all)")
    mmlu_limit: int | None = opt(None, "at most this many MMLU dev questions in mmlu and mmlu_explanations "
                                       "(empty: all 282)")
    max_new_tokens: int = opt(256, "generation budget for math answers")
    batch_size: int = opt(8, "eval batch size")

    def __post_init__(self) -> None:
        from ..data import TASKS, removed_task

        known = (*EVAL_ALIASES, *(t for t in TASKS if t != "file"))
        removed = [removed_task(t) for t in self.tasks if removed_task(t)]
        if removed:
            raise ValueError(f"eval.tasks: {removed[0]}")
        bad = [t for t in self.tasks if t not in known and not (t.startswith("file:") and len(t) > 5)]
        if bad:
            raise ValueError(f"eval.tasks: unknown eval set(s) {bad}; use {list(known)} or file:<path>")
        if not self.math_scores or set(self.math_scores) - {"accuracy", "loss"}:
            raise ValueError(f"eval.math_scores must name accuracy and/or loss, got {self.math_scores}")
        _positive("eval", limit=self.limit, mmlu_limit=self.mmlu_limit, max_new_tokens=self.max_new_tokens,
                  batch_size=self.batch_size, loss_max_length=self.loss_max_length)


@dataclass
class TrainConfig:
    """``dude train``: fine-tune one adapter."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class EvalTarget:
    adapter: str | None = opt(None, "adapter directory (dude train / dude.save, or PEFT LoRA/DoRA) to evaluate "
                                    "on top of model.name_or_path (empty: the model alone, base or merged)")
    output_dir: str = opt("runs/eval", "where eval.json goes")
    overwrite: bool = opt(False, "replace an existing eval.json")


@dataclass
class EvalCommandConfig:
    """``dude eval``: a base model, an adapter, or a merged model on eval sets.
    ``data`` says which task 'heldout' refers to. For a run folder of ``dude train`` the
    CLI takes it from the run's ``config.yaml``, and data options that contradict the
    run's split are refused (``commands.check_run_split``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    target: EvalTarget = field(default_factory=EvalTarget)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(tasks=["heldout", "mmlu"]))


@dataclass
class ExportTarget:
    adapter: str = opt("", "adapter directory written by dude train / dude.save (required)")
    output_dir: str = opt("", "merged model folder to write (required)")
    overwrite: bool = opt(False, "replace a non-empty output_dir")
    full_precision: bool = opt(False, "an adapter trained on a 4-bit base (quantize): merge it into the "
                                      "full-precision weights (the model to deploy), not into deq(Q)")
    gguf: str | None = opt(None, "write one GGUF file for llama.cpp / Ollama (output_dir/model-TYPE.gguf, with its "
                                 "faithfulness report) instead of a transformers folder: f32, f16, bf16, q8_0 "
                                 "(recommended), q4_0, q4_1, q5_0, q5_1", bare="q8_0")

    def __post_init__(self) -> None:
        if not self.adapter:
            raise ValueError("export.adapter is required: the adapter directory to merge (--adapter DIR)")
        if not self.output_dir:
            raise ValueError("export.output_dir is required: where to write the merged model (--output-dir DIR)")
        if self.gguf is not None:
            from ..export.gguf_write import check_type

            check_type(self.gguf, "export.gguf (--gguf)")


@dataclass
class ExportConfig:
    """``dude export``: adapter directory -> merged transformers model folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    export: ExportTarget = field(default_factory=ExportTarget)
