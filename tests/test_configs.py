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
