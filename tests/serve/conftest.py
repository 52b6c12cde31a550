"""Fixtures shared by the model-server tests."""

import pytest


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    """The HF backend on the tiny Llama (batching width 8, one thread), closed after the module.
    Modules with another backend (EFT) define their own ``backend``."""
    from serve.llm import HFBackend

    b = HFBackend(str(tiny_model_dir), model_id="tiny", max_batch_size=8, torch_threads=1)
    yield b
    b.engine.close()
