"""Smoke test of the training job through `ray job submit` against a separate local cluster.

    python scripts/ray_job_submit_train.py CONFIG [dotted.key=value ...]

Starts `ray start --head --block` in its own process group, on free ports and its own temp dir (so
it never meets another Ray instance on the machine, e.g. a test session's), submits
`python -m pipelines.train CONFIG ...` with `--working-dir .`, waits for the job, then stops exactly
that cluster (its process group) — never `ray stop`, which would stop every Ray on the machine.
Exit code: the job's (0 = SUCCEEDED).
"""

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import List

log = logging.getLogger("ray_job_submit_train")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
              "--node-manager-port", "--object-manager-port")


def free_ports(n: int) -> List[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return  # answering (e.g. 401 under Ray's token authentication): the server is up
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")


def main(argv: List[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not argv:
        print(__doc__)
        return 2
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    workers = free_ports(1)[0]
    # Ray's temp-dir socket paths must stay short (AF_UNIX limit): use /tmp directly.
    temp_dir = tempfile.mkdtemp(prefix="rjs-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A throwaway cluster bound to 127.0.0.1: no token authentication for it or its client.
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    # This interpreter's bin first: `ray`, and the job's `python`, come from the same (virtual) env.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    cmd = ["ray", "start", "--head", "--block", "--num-cpus=2", f"--temp-dir={temp_dir}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
           f"--min-worker-port={workers}", f"--max-worker-port={workers + 200}"]
    cmd += [f"{k}={v}" for k, v in ports.items()]
    start_log = open(os.path.join(temp_dir, "ray_start.log"), "w")
    head = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, stdout=start_log, stderr=start_log)
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        try:
            _wait_http(f"{address}/api/version", 300, head)
        except (TimeoutError, RuntimeError):
            start_log.flush()
            with open(start_log.name, encoding="utf-8") as f:
                log.error("ray start output:\n%s", f.read()[-3000:])
            raise
        log.info("cluster up at %s (temp dir %s)", address, temp_dir)
        submit = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
                  "python", "-m", "pipelines.train", *argv]
        rc = subprocess.run(submit, env=env, cwd=REPO, timeout=1200).returncode
        log.info("ray job submit exited with %d", rc)
        return rc
    finally:
        # The whole process group of `ray start --block`: GCS, raylet, dashboard, workers.
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(head.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.info("cluster stopped")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
