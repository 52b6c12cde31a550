"""Every shipped config loads against the schema, and its header names the command that runs it."""

import pathlib
import subprocess
import sys

import pytest

from agenttuning.config import ConfigError, load_config

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    load_config(str(path))
    lines = path.read_text().splitlines()
    header = "\n".join(line for line in lines[: next(i for i, x in enumerate(lines + [""]) if not x.startswith("#"))])
    assert any(cmd in header for cmd in ("agenttuning ", "python -m ", "serve run ")), f"{path.name}: header names no command"


@pytest.mark.parametrize(
    "override,key",
    [("data.etaa=0.1", "data.etaa"), ("data.eta=lots", "data.eta"), ("train.max_steps=1.5", "train.max_steps"),
     ("data.sources.0.group=robots", "data.sources.0.group"), ("data.eta=1.5", "data.eta")],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".0.", r"(\.0\.|\[0\]\.)")):
        load_config(str(CONFIGS[0].parent / "data_example.yaml"), [override])


def test_cli_rejects_bad_config_before_work():
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "configs/data_example.yaml", "data.etaa=1"],
                       capture_output=True, text=True, cwd=CONFIGS[0].parents[1], timeout=120)
    assert r.returncode == 2 and "data.etaa" in r.stderr


def test_data_preview_cli_marks_supervised_spans(tiny_model_dir):
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "preview", "configs/data_example.yaml",
                        f"model.name_or_path={tiny_model_dir}"],
                       capture_output=True, text=True, cwd=CONFIGS[0].parents[1], timeout=300)
    assert r.returncode == 0, r.stderr
    assert "===== agentinstruct_example (agent)" in r.stdout and "⟦ Think:" in r.stdout
    # The one-shot demonstration (loss: false) is shown unmarked.
    assert "⟦ OK. </s>⟧" not in r.stdout and " OK. </s>" in r.stdout


def test_every_config_key_has_a_meaning():
    """`--help` prints a one-line meaning for every key: each schema field carries a comment."""
    import dataclasses

    from agenttuning import schema
    from agenttuning.cli import _field_comments

    comments = _field_comments()
    missing = []
    for cls in vars(schema).values():
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == schema.__name__:
            for f in dataclasses.fields(cls):
                if not any((c.__name__, f.name) in comments for c in cls.__mro__):
                    missing.append(f"{cls.__name__}.{f.name}")
    assert missing == []


def test_help_lists_keys_and_print_config_resolves(capsys):
    from pipelines.cli import JOBS, main

    repo = CONFIGS[0].parents[1]
    helps = {}
    for job in JOBS:  # in process: one import of every job instead of a Python start per job
        with pytest.raises(SystemExit) as exit_:
            main([job, "--help"])
        helps[job] = capsys.readouterr().out
        assert exit_.value.code in (0, None) and "config sections read by this job" in helps[job], job
    assert "train.lr = 5e-05  # peak learning rate" in helps["train"]
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "configs/quickstart.yaml", "data.eta=0.3",
                        "--print-config"], capture_output=True, text=True, cwd=repo, timeout=120)
    assert r.returncode == 0 and "eta: 0.3" in r.stdout
    assert "path: " + str(repo / "data" / "agentbench" / "dbbench_dev.jsonl") not in r.stdout  # no ${data:} here
    assert "output_dir: outputs/run/data" in r.stdout  # interpolations resolved


def test_named_list_overrides():
    cfg = load_config(str(CONFIGS[0].parent / "quickstart.yaml"), ["data.sources.general_offline.weight=3"])
    assert [s.weight for s in cfg.data.sources] == [1.0, 3.0]
    with pytest.raises(ConfigError, match="no item named 'sharegpt'.*agentinstruct_db, general_offline"):
        load_config(str(CONFIGS[0].parent / "quickstart.yaml"), ["data.sources.sharegpt.path=x"])
