"""Serve app lifecycle: a job whose HTTP port another process holds stops before deploying, with
the key to change; a job that finds Serve already running in its own Ray instance reuses it."""

import socket

import pytest

from agenttuning.config import ConfigError
from agenttuning.schema import ServeConfig


def test_a_port_held_elsewhere_stops_the_job_before_serve_starts(ray_local):
    from ray import serve

    from serve.lifecycle import _serve_running, start_serve

    if _serve_running():  # left by an earlier module of this session: the check is for a fresh start
        serve.shutdown()
    with socket.socket() as held:  # what another Ray instance's proxy looks like from here
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"'serve.port': 127.0.0.1:{port} is already in use"):
            start_serve(ServeConfig(port=port))
    assert not _serve_running()  # nothing was started

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        start_serve(ServeConfig(port=port))
        assert _serve_running()
        start_serve(ServeConfig(port=port))  # its own proxy holds the port now: no error
    finally:
        serve.shutdown()
