"""The ``dude`` command: train, eval, compare, export.

Thin on purpose (the torchtune / litgpt habit): parse a YAML ``--config`` and the flags
that override it into the typed config of the command, log the resolved config, call
the package. Every option of the config dataclasses is a flag; ``dude <command> --help``
lists them by YAML section.

    dude compare                                  # the main job: 4 methods, default model and task
    dude train --config configs/smoke.yaml --output-dir runs/smoke
    dude eval --adapter runs/smoke --tasks heldout mmlu --limit 32
    dude export --adapter runs/smoke --output-dir runs/smoke-merged

Exit codes: 0 done; 1 training diverged; 2 bad input, or a run that cannot go on (a folder
in use, no whole checkpoint to resume); 74 a write failed (a full disk: EX_IOERR);
128+signum stopped by SIGTERM (143) or SIGUSR1 (138) after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Any, Callable

import yaml

from .train import distributed, options

COMMANDS = {
    "train": "fine-tune one adapter (LoRA, DoRA, PiSSA or DuDe) and write it with metrics, plot, config",
    "eval": "evaluate a base model, a dude/PEFT adapter directory or a merged model; writes eval.json",
    "compare": "train LoRA, DoRA, PiSSA and DuDe on the same task, budget and seeds; table + plot + JSON",
    "export": "merge an adapter directory into a plain transformers model folder (save_pretrained), or one GGUF file (--gguf)",
}

ADAPTER_HELP = {  # dude.AdapterConfig documents its fields in its docstring, not in field metadata
    "method": "lora, dora, pissa or dude",
    "r": "rank of the update B @ A",
    "alpha": "scaling numerator: s = alpha / r (alpha / sqrt(r) with rsLoRA)",
    "use_rslora": "rank-stabilised scaling",
    "dropout": "dropout on the adapter branch's input",
    "target_modules": "module names to adapt (name or '.'-suffix match)",
    "exclude_modules": "module names to leave alone",
    "svd": "exact or randomized SVD for the PiSSA/DuDe init",
    "svd_niter": "power iterations of the randomized SVD",
    "svd_oversample": "extra directions of the randomized SVD",
    "seed": "seed of the randomized SVD and of LoRA's Kaiming init",
    "detach_norm": "treat the DoRA/DuDe row norm as a constant in backward",
    "quantize": "nf4 or fp4: frozen part in 4 bits (QLoRA, QDoRA, QPiSSA, QDuDe; bitsandbytes); empty: full precision",
    "quant_iters": "T > 1: LoftQ-style alternations of the pissa/dude split and the 4-bit residual",
    "quant_magnitude": "DoRA/DuDe m0 on a 4-bit base: full (||W||_row) or quantized (||deq(Q) + s B0 A0||_row)",
}


def _config_class(command: str) -> type:
    if command == "train":
        from .train.config import TrainConfig

        return TrainConfig
    if command == "eval":
        from .train.config import EvalCommandConfig

        return EvalCommandConfig
    if command == "export":
        from .train.config import ExportConfig

        return ExportConfig
    from .compare import CompareConfig

    return CompareConfig


def _runner(command: str) -> Callable[[Any], Any]:
    if command == "train":
        from .train import train

        return train
    if command == "compare":
        from .compare import run_compare

        return run_compare
    from .train import commands

    return commands.run_eval if command == "eval" else commands.run_export


def _defaults_for(command: str) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """Defaults that depend on the given options: ``dude eval`` of a run folder reads the
    run's data options, so that eval set 'heldout' is the rows that run held out; ``dude
    compare`` takes a given lr for every method, and scores the sets its task has."""
    if command == "eval":
        from .train.commands import run_defaults

        return run_defaults
    if command == "compare":
        from .compare.config import compare_defaults

        return compare_defaults
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dude", description="Fine-tune language models with DuDe, DoRA, PiSSA or LoRA adapters.",
        epilog="Options come from a YAML --config, overridden by flags. 'dude <command> --help' lists them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", metavar="YAML", help="YAML file of options (sections as below); flags override it")
        p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
        options.add_flags(p, _config_class(name), ADAPTER_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        config = options.resolve(_config_class(args.command), args.config, args, _defaults_for(args.command))
    except (ValueError, FileNotFoundError) as err:
        print(f"dude {args.command}: error: {err}", file=sys.stderr)
        return 2
    text = yaml.safe_dump(options.to_dict(config), sort_keys=False)
    if args.print_config:  # once per launch: under torchrun / accelerate, rank 0 prints it
        if distributed.launched_rank() == 0:
            print(text, end="")
        return 0
    if distributed.launched_rank() != 0:  # under torchrun / accelerate: logged once; errors print on every rank
        pass
    elif os.environ.get("DUDE_CONFIG_LOGGED"):  # a child of dude compare: its config file is the log
        print(f"dude {args.command} --config {args.config}", file=sys.stderr)
    else:
        print(f"dude {args.command}: resolved config\n" + "\n".join("  " + line for line in text.splitlines()),
              file=sys.stderr)
    from .compare.runner import RunsFailed
    from .hub import ModelFetchError
    from .safe_write import EXIT_IO, WriteFailed
    from .train import TrainingDiverged
    from .train.preempt import Preempted

    try:
        _runner(args.command)(config)
    except (TrainingDiverged, RunsFailed) as err:
        print(f"dude {args.command}: {err}", file=sys.stderr)
        return 1
    except ModelFetchError as err:
        print(f"dude {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Preempted as err:  # SIGTERM / SIGUSR1: saved; exit 128+signum as a killed process would
        if distributed.launched_rank() == 0:
            print(f"dude {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except WriteFailed as err:  # a full disk: one line, its own exit code
        print(f"dude {args.command}: error: {err.strerror}", file=sys.stderr)
        return EXIT_IO
    except (ValueError, OSError) as err:  # OSError: also a path under a file, no permission, a full disk
        if os.environ.get("DUDE_DEBUG"):
            raise
        system = isinstance(err, OSError) and err.errno is not None and err.filename  # not one of our messages
        text = f"{err.strerror}: {err.filename!r}" if system else err
        print(f"dude {args.command}: error: {text}  (DUDE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_IO if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
