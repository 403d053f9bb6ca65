"""Experiment trackers of ``dude train --report-to``: TensorBoard, Weights & Biases, MLflow, trackio.

The names and habits are transformers' ``report_to`` (``integrations/integration_utils.py``:
``TensorBoardCallback``, ``WandbCallback``, ``MLflowCallback``, ``TrackioCallback``): ``all``
is every installed tracker, ``none`` (the default) none, and each tracker reads its own
environment variables (``WANDB_MODE``, ``WANDB_PROJECT``, ``WANDB_DIR``, ``MLFLOW_TRACKING_URI``,
``MLFLOW_EXPERIMENT_NAME``, ``TRACKIO_DIR``, ``TENSORBOARD_LOGGING_DIR``). Nothing is forced
offline: W&B without a login stops the start in one line that names ``WANDB_MODE=offline``.

metrics.jsonl stays the record. Every line appended to it goes to every tracker at its
``step``, each other field as ``train/<field>`` (loss, lr, grad_norm, tokens_per_s, epoch,
elapsed_s); the eval results go as ``eval/<set>/<number>`` at the last step; the resolved
config, flattened to ``section.option`` keys, as hyperparameters. Only rank 0 reports.
One process is one tracker run: ``--resume`` opens a new run of the same name from the
checkpoint's step (TensorBoard: the same folder, the steps run again purged from it).
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

NAMES = ("tensorboard", "wandb", "mlflow", "trackio")  # pip extra of dude = the tracker's name
DEFAULT_PROJECT = "dude"  # W&B project, MLflow experiment, trackio project, unless named


def installed(name: str) -> bool:
    """The tracker's module imports (an import, not a ``find_spec``: a broken install fails here)."""
    try:
        importlib.import_module("torch.utils.tensorboard" if name == "tensorboard" else name)
    except ImportError:
        return False
    return True


def resolve(report_to: list[str]) -> list[str]:
    """``run.report_to`` -> the trackers to start: ``all`` is every installed one (transformers'
    rule); a named tracker that is not installed is refused in one line naming the pip extra."""
    if "all" in report_to:
        return [n for n in NAMES if installed(n)]
    missing = [n for n in report_to if not installed(n)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ValueError(f"run.report_to: {' and '.join(missing)} {verb} not installed; "
                         f"pip install 'dude[{','.join(missing)}]'")
    return list(report_to)


def default_run_name(output_dir: str | Path) -> str:
    """The run's name in the trackers when ``run.run_name`` is empty: its folder's name."""
    return Path(output_dir).resolve().name


def flatten(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"adapter": {"r": 16}}`` -> ``{"adapter.r": 16}``; lists and mappings as JSON text."""
    return {f"{section}.{key}": json.dumps(value) if isinstance(value, (list, dict)) else value
            for section, options in config.items() for key, value in options.items()}


def eval_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The numbers of ``eval.json`` (accuracy, correct, n, loss, perplexity, seconds...) as
    ``eval/<set>/<field>``; predictions and other lists are left out."""
    return {f"eval/{name}/{key}": value for name, result in results.items() for key, value in result.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoard:
    """``SummaryWriter`` in ``<output_dir>/tensorboard``, or ``$TENSORBOARD_LOGGING_DIR/<run name>``
    (a folder shared by runs). Opened at the first point, so a start that fails later leaves no
    folder; ``purge_step`` hides the points of an earlier try at the steps run again."""

    def __init__(self, project: str, out: Path):
        self.out, self.writer, self.dir = out, None, out / "tensorboard"

    def start(self, config: dict[str, Any], run_name: str, first_step: int) -> None:
        shared = os.environ.get("TENSORBOARD_LOGGING_DIR")
        self.dir = Path(shared).expanduser() / run_name if shared else self.out / "tensorboard"
        self.config, self.first_step = config, first_step
        print(f"tensorboard: logging to {self.dir} (tensorboard --logdir {self.dir})")

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(self.dir), purge_step=self.first_step)
        self.writer.add_text("config", "```\n" + yaml.safe_dump(self.config, sort_keys=False) + "```")
        values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(self.config).items()}
        # writer.add_hparams would open a second run folder; these three summaries go in this one
        for summary in hparams(values, {"train/loss": 0.0}):  # the metric is named, not written
            self.writer._get_file_writer().add_summary(summary)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.writer is None:
            self._open()
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, failed: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Wandb:
    """``wandb.init`` (or the run the caller opened, as transformers does); ``WANDB_MODE=offline``
    writes the run under ``$WANDB_DIR/wandb`` (default: the working folder) for ``wandb sync``."""

    def __init__(self, project: str, out: Path):
        self.project, self.run, self.own = project, None, False

    def start(self, config: dict[str, Any], run_name: str, first_step: int) -> None:
        import wandb

        if wandb.run is None:
            self.run = wandb.init(project=self.project or os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
                                  name=run_name, config=flatten(config))
            self.own = True
        else:
            self.run = wandb.run
            self.run.config.update(flatten(config), allow_val_change=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, failed: bool = False) -> None:
        if self.own and self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
        self.run = None


class MLflow:
    """``mlflow.start_run`` in experiment ``run.project`` / ``$MLFLOW_EXPERIMENT_NAME`` / dude, at
    ``$MLFLOW_TRACKING_URI`` (unset: mlflow's default); a run already active is used as is."""

    def __init__(self, project: str, out: Path):
        self.project, self.own, self.mlflow = project, False, None

    def start(self, config: dict[str, Any], run_name: str, first_step: int) -> None:
        import mlflow
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        self.mlflow = mlflow
        if mlflow.active_run() is None:
            mlflow.set_experiment(self.project or os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT))
            mlflow.start_run(run_name=run_name)
            self.own = True
        params = [(k, str(v)) for k, v in flatten(config).items() if len(str(v)) <= MAX_PARAM_VAL_LENGTH]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            mlflow.log_params(dict(params[i:i + MAX_PARAMS_TAGS_PER_BATCH]))

    def log(self, metrics: dict[str, float], step: int) -> None:
        # transformers' sanitising: mlflow refuses other characters (an eval set file:<path> may have them)
        self.mlflow.log_metrics({re.sub(r"[^0-9A-Za-z_\-. :/]", "_", k): v for k, v in metrics.items()}, step=step)

    def finish(self, failed: bool = False) -> None:
        if self.own and self.mlflow is not None and self.mlflow.active_run() is not None:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
        self.own = False


class Trackio:
    """``trackio.init`` in project ``run.project`` / dude, stored in ``$TRACKIO_DIR`` (default
    ``~/.cache/huggingface/trackio``); ``trackio show`` opens its dashboard."""

    def __init__(self, project: str, out: Path):
        self.project, self.trackio = project, None

    def start(self, config: dict[str, Any], run_name: str, first_step: int) -> None:
        import trackio

        # resume="never": a second run of the same name is a new run, like W&B and MLflow here
        trackio.init(project=self.project or DEFAULT_PROJECT, name=run_name, config=flatten(config), resume="never")
        self.trackio = trackio

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def finish(self, failed: bool = False) -> None:
        if self.trackio is not None:
            self.trackio.finish()
        self.trackio = None


TRACKERS = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": MLflow, "trackio": Trackio}
HINTS = {"wandb": " (without a login or a network, WANDB_MODE=offline writes the run locally; `wandb sync` "
                  "uploads it later)"}


class Reporters:
    """The trackers of one run. Every rank checks that they are installed (so that all stop
    together); only the main rank (``main``) holds and starts them."""

    def __init__(self, report_to: list[str], output_dir: str, run_name: str | None, project: str | None,
                 main: bool = True):
        names = resolve(report_to)
        out = Path(output_dir)
        self.trackers = {n: TRACKERS[n](project, out) for n in names} if main else {}
        self.run_name = run_name or default_run_name(output_dir)
        self.started: list[str] = []

    def start(self, config: dict[str, Any], step: int) -> None:
        """Start each tracker for a run at ``step`` (0, or the step resumed from); one that
        fails stops the others, in one line that names it."""
        for name, tracker in self.trackers.items():
            try:
                tracker.start(config, self.run_name, step + 1)
            except Exception as err:
                self.finish(failed=True)
                text = " ".join(str(err).split()) or type(err).__name__
                raise ValueError(f"run.report_to: {name} did not start: {text}{HINTS.get(name, '')}") from err
            self.started.append(name)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name in self.started:
            self.trackers[name].log(metrics, step)

    def log_record(self, record: dict[str, Any]) -> None:
        """A line of metrics.jsonl: its fields but ``step`` as ``train/<field>`` at ``step``."""
        self.log({f"train/{k}": v for k, v in record.items() if k != "step"}, record["step"])

    def finish(self, failed: bool = False) -> None:
        """Close every started tracker. After a failure an error here is printed, not raised
        (it must not hide the failure)."""
        started, self.started = self.started, []
        for name in started:
            try:
                self.trackers[name].finish(failed)
            except Exception as err:
                if not failed:
                    raise
                print(f"run.report_to: {name} did not close cleanly: {err}")
