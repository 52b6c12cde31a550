"""Shared fixtures. Nothing here reaches the network: hubs offline, wandb offline, 127.0.0.1 only."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.pop("RAY_ADDRESS", None)

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH_DATA = REPO / "data"  # the real benchmark files shipped in the repo (data/README.md)


@pytest.fixture(scope="session")
def bench_data() -> pathlib.Path:
    """The real benchmark data shipped in the repo's data/ folder (never skipped: it is part of the clone)."""
    return BENCH_DATA


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with 2 CPUs for the whole session, shut down at the end."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> pathlib.Path:
    """A locally built tiny Llama + BPE tokenizer in HF format (built once per test session)."""
    from agenttuning.config import TinyModelConfig
    from agenttuning.models import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(str(out), TinyModelConfig(enabled=True))
    return out
