"""OS environment on AgentBench's real os_dev.json, in real bubblewrap sandboxes."""

import shutil
import socket
import subprocess
import threading
import time

import pytest

import serve.envs as envs
from serve.envs.os_shell import check, parse_action
from serve.envs.sandbox import Sandbox, SandboxUnavailable

pytestmark = pytest.mark.skipif(not shutil.which("bwrap"), reason="bubblewrap not installed")


@pytest.fixture(scope="module")
def env(bench_data):
    try:  # a machine that cannot sandbox at all (no user namespaces) skips, saying why
        Sandbox().close()
    except SandboxUnavailable as exc:
        pytest.skip(f"sandboxes unavailable here: {exc}")
    return envs.load("os", str(bench_data / "agentbench/os_dev.json"), command_timeout=2.0)


def test_tasks_and_skips(env):
    assert len(env.tasks()) == 23
    assert env.skipped == {
        "3": "check script 'check/0.sh' is not available",
        "5": "check script 'check/0.sh' is not available",
        "25": "init script file 'init/stock-log.sh' is not available",
    }
    with pytest.raises(envs.UnknownTask, match="skipped at load"):
        env.reset("3")


def test_expert_passes_and_wrong_answers_fail(env):
    scores = {tid: envs.run_episode(env, tid).reward for tid in env.tasks()}
    assert sum(scores.values()) / len(scores) >= 0.9, scores
    for tid in ["0", "6", "8", "14", "22"]:  # match, integer, size, integer-on-groups, string
        env.reset(tid)
        r = env.step("Think: a guess.\n\nAct: answer(999999)")
        assert r.done and r.status == envs.Status.COMPLETED and r.reward == 0.0, tid


def test_protocol_details(env):
    msgs = env.reset("6")
    assert msgs[0]["content"].startswith("You are an assistant that will act like a person")
    assert msgs[-1]["content"].endswith("How many hidden files are in /home? (not including subdirectories)")
    assert [m.get("loss", True) for m in msgs if m["role"] == "assistant"] == [False] * 3
    r = env.step("Think: look.\n\nAct: bash\n\n```bash\nseq 1 1000\n```")
    assert r.observation.startswith("The output of the OS:\n\n1\n2\n")
    assert r.observation.endswith("[truncated because the output is too long]")
    # AgentBench keeps 780 characters and appends the note
    assert len(r.observation) == len("The output of the OS:\n\n") + 780 + len("\n[truncated because the output is too long]")
    r = env.step("Think: nothing.\n\nAct: bash\n\n```bash\ntrue\n```")
    assert r.observation == "The output of the OS is empty."
    r = env.step("I am not sure what to do")
    assert r.done and r.status == envs.Status.INVALID_FORMAT
    assert parse_action("Act: bash\n```bash\nls\n```\nAct: answer(3)") == {"action": "answer", "content": "3"}
    assert check("size-match", "4.0K", "4K") and not check("size-match", "4K", "8K")
    assert check("string-match", "installed\r\n", "installed") and check("integer-match", " 7", "7\n")


CANARY = "host secret 0123456789"


@pytest.fixture()
def host_side(tmp_path):
    """A canary file, a TCP listener counting connections, and a sleeping process, all on the host."""
    canary = tmp_path / "canary.txt"
    canary.write_text(CANARY)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    hits, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                hits.append(srv.accept())
            except OSError:
                pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    proc = subprocess.Popen(["sleep", "300"])
    yield {"canary": canary, "port": srv.getsockname()[1], "hits": hits, "proc": proc}
    stop.set()
    th.join()
    srv.close()
    proc.kill()
    proc.wait()


def _bash(code: str) -> str:
    return f"Think: try.\n\nAct: bash\n\n```bash\n{code}\n```"


def test_hostile_actions_are_contained(env, host_side, tmp_path):
    canary, port = host_side["canary"], host_side["port"]
    free_before = shutil.disk_usage(str(tmp_path)).free
    other = env.spawn()  # a concurrent session that must stay healthy
    other.reset("6")
    hostile = [
        f"cat {canary}; ls {tmp_path}; cat /proc/1/root{canary}",  # reading host files
        f"echo pwned > {canary}; rm -rf --no-preserve-root / 2>/dev/null; ls /usr | head -3",
        f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)\"; "
        f"(exec 3<>/dev/tcp/127.0.0.1/{port}) ; curl -m 2 http://1.1.1.1 ; echo net-done",
        "sleep 100000",  # sleeping forever: the command timeout kills it
        "dd if=/dev/zero of=/root/fill bs=1M count=100000 2>&1 | head -1; df -h / | tail -1",
        "python3 -c \"x = bytearray(8 * 1024 ** 3)\" 2>&1 | tail -1",  # memory
        ":(){ :|:& };:",  # fork bomb
        f"kill -9 {host_side['proc'].pid}; kill -9 -1",  # kill host processes, then everything
    ]
    outputs = []
    for code in hostile:
        env.reset("6")
        t0 = time.monotonic()
        r = env.step(_bash(code))
        outputs.append(r.observation)
        assert time.monotonic() - t0 < 2.0 + 8.0, code  # command timeout + cleanup margin
        if not r.done:  # the episode goes on and can still be ended by the agent
            r = env.step("Think: done.\n\nAct: answer(6)")
        assert r.done and r.status in (envs.Status.COMPLETED, envs.Status.TASK_ERROR), (code, r)
    assert CANARY not in "".join(outputs)
    assert canary.read_text() == CANARY
    assert host_side["hits"] == []
    assert "Network is unreachable" in outputs[2] or "Connection refused" in outputs[2]
    assert "timed out" in outputs[3]
    assert "No space left on device" in outputs[4]
    assert "MemoryError" in outputs[5]
    assert host_side["proc"].poll() is None  # the host process survived
    # The fill stopped at the 128 MB tmpfs (ENOSPC above); the host disk did not absorb the ~GBs
    # dd would have written in 2 s (loose bound: other jobs share this disk).
    assert free_before - shutil.disk_usage(str(tmp_path)).free < 512 * 1024 ** 2
    r = other.step(_bash("ls -a /home | grep '^\\.' | wc -l"))
    assert r.observation.strip().endswith("8")  # 6 hidden files plus . and ..
    other.close()


def test_bad_records_are_skipped_with_reasons(tmp_path):
    p = tmp_path / "os.json"
    p.write_text('[{"description": "ok?", "evaluation": {"match": "1"}}, {"evaluation": {"match": "1"}},'
                 ' {"description": "x"}, {"description": "y", "evaluation": {"check": [null, {"file": "check/z.py"}],'
                 ' "example": "echo 1"}}]')
    e = envs.load("os", str(p))
    assert e.tasks() == ["0"]
    assert e.skipped == {"1": "missing field 'description'",
                         "2": "field 'evaluation' needs 'match' or 'check'",
                         "3": "check script 'check/z.py' is not available"}
