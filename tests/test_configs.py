"""Every shipped recipe in configs/ parses and validates (torchtune's test_configs habit),
and the options machinery refuses bad input with the option's name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dude.cli import _config_class
from dude.compare import CompareConfig
from dude.train.config import TrainConfig
from dude.train.options import build, load_yaml, to_dict

ROOT = Path(__file__).parents[1] / "configs"
ACCELERATE = sorted((ROOT / "accelerate").glob("*.yaml"))  # accelerate's own config files
CONFIGS = sorted(set(ROOT.rglob("*.yaml")) - set(ACCELERATE))


def _command(path: Path) -> str:
    """The command a recipe is for, from its first line: ``# dude <command> --config ...``."""
    match = re.match(r"# dude (train|eval|compare|export) --config (\S+)", path.read_text().splitlines()[0])
    assert match, f"{path}: first line must be '# dude <command> --config <path>'"
    assert path.as_posix().endswith(match.group(2)), f"{path}: its first line names another file"
    return match.group(1)


def test_configs_exist():
    assert {"compare.yaml", "smoke.yaml"} <= {p.name for p in CONFIGS}
    assert any("paper" in p.parts for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(p.parents[1]).as_posix())
def test_config_loads(path: Path):
    config = build(_config_class(_command(path)), load_yaml(path))
    again = build(type(config), to_dict(config))  # the resolved form round-trips
    assert again == config


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_loads(path: Path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(path)
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    assert not config.fsdp_config["fsdp_offload_params"]  # refused by dude.train.distributed


def test_default_compare_config_is_the_no_argument_run():
    """configs/compare.yaml documents exactly what `dude compare` runs with no arguments."""
    shipped = build(CompareConfig, load_yaml(next(p for p in CONFIGS if p.name == "compare.yaml")))
    assert shipped == CompareConfig()


def test_paper_recipes_have_the_paper_shape():
    paper = [build(_config_class(_command(p)), load_yaml(p)) for p in CONFIGS if "paper" in p.parts]
    for cfg in paper:
        assert cfg.model.name_or_path and cfg.model.dtype == "bfloat16"
        assert cfg.adapter.r >= 64 and cfg.data.task == "file"
        assert cfg.data.format == "metamath" and cfg.data.eval_fraction == 0  # MetaMathQA as published
        assert any(t.startswith("file:") and "gsm8k" in t for t in cfg.eval.tasks)
        assert any(t.startswith("file:") and "mmlu" in t for t in cfg.eval.tasks)


@pytest.mark.parametrize("data, message", [
    ({"optim": {"lr": -1}}, "optim.lr must be > 0"),
    ({"optim": {"lr": "fast"}}, "option optim.lr must be a finite number"),
    ({"optim": {"lr": float("inf")}}, "option optim.lr must be a finite number, got inf"),
    ({"optim": {"lr": "nan"}}, "option optim.lr must be a finite number, got 'nan'"),
    ({"optim": {"steps": 2.5}}, "option optim.steps must be an integer"),
    ({"optim": {"learning_rate": 1e-4}}, r"unknown option\(s\) \['optim.learning_rate'\]"),
    ({"data": {"task": "gsm9k"}}, "data.task must be one of"),
    ({"data": {"task": "file"}}, "data.task 'file' needs data.path"),
    ({"adapter": {"method": "qlora"}}, "AdapterConfig.method must be one of"),
    ({"eval": {"tasks": ["mmlu", "gsm9k"]}}, r"eval.tasks: unknown eval set\(s\) \['gsm9k'\]"),
    ({"run": {"resume": True, "overwrite": True}}, "exclude each other"),
    ({"optimizer": {}}, r"unknown option\(s\) \['optimizer'\]"),
    ({"optim": [1, 2]}, "section optim must be a mapping"),
])
def test_bad_options_are_named(data, message):
    with pytest.raises(ValueError, match=message):
        build(TrainConfig, data)


def test_yaml_floats_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": "3e-4"}}))  # YAML 1.1 reads 3e-4 as a string
    assert build(TrainConfig, load_yaml(path)).optim.lr == 3e-4


def test_list_flags_of_numbers_are_numbers():
    """`dude compare --seeds 0 1`: argparse gives strings; a list of ints takes ints."""
    from dude.cli import build_parser
    from dude.train.options import resolve

    args = build_parser().parse_args(["compare", "--seeds", "0", "1"])
    assert resolve(CompareConfig, None, args).compare.seeds == [0, 1]
    with pytest.raises(ValueError, match=r"compare.seeds\[0\] must be an integer, got 'x'"):
        resolve(CompareConfig, None, build_parser().parse_args(["compare", "--seeds", "x"]))


def test_gguf_flag_alone_means_q8_0():
    """`dude export --gguf` with no type writes the recommended q8_0; a type still wins."""
    from dude.cli import build_parser
    from dude.train.config import ExportConfig
    from dude.train.options import resolve

    base = ["export", "--adapter", "run", "--output-dir", "out"]
    assert resolve(ExportConfig, None, build_parser().parse_args([*base, "--gguf"])).export.gguf == "q8_0"
    assert resolve(ExportConfig, None, build_parser().parse_args([*base, "--gguf", "f16"])).export.gguf == "f16"
    assert resolve(ExportConfig, None, build_parser().parse_args(base)).export.gguf is None
    help_text = build_parser()._subparsers._group_actions[0].choices["export"].format_help()
    assert "(the flag alone: q8_0)" in " ".join(help_text.split())
