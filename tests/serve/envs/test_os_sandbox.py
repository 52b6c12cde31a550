"""The OS sandbox itself: containment of hostile commands, the /usr overlay, the uid modes."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

import serve.envs as envs
from serve.envs import sandbox_idmap
from serve.envs.sandbox import Sandbox, SandboxUnavailable

pytestmark = pytest.mark.skipif(not shutil.which("bwrap"), reason="bubblewrap not installed")


@pytest.fixture(scope="module")
def env(bench_data):
    try:
        Sandbox().close()
    except SandboxUnavailable as exc:
        pytest.skip(f"sandboxes unavailable here: {exc}")
    return envs.load("os", str(bench_data / "agentbench/os_dev.json"), command_timeout=2.0)


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
        # the /usr overlay is bounded too (two files: each stays under the file-size limit)
        "for f in 1 2; do dd if=/dev/zero of=/usr/fill$f bs=1M count=100 2>&1 | grep -v records; done",
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
    assert "No space left on device" in outputs[4] and "No space left on device" in outputs[8]
    assert "MemoryError" in outputs[5]
    assert host_side["proc"].poll() is None  # the host process survived
    # The fills stopped at the 128 MB tmpfs (ENOSPC above); the host disk did not absorb the
    # ~GBs dd would have written in 2 s (loose bound: other jobs share this disk).
    assert free_before - shutil.disk_usage(str(tmp_path)).free < 512 * 1024 ** 2
    assert not os.path.exists("/usr/fill1") and not os.path.exists("/usr/fill2")
    r = other.step(_bash("ls -a /home | grep '^\\.' | wc -l"))
    assert r.observation.strip().endswith("8")  # 6 hidden files plus . and ..
    other.close()


def test_usr_is_copy_on_write_and_host_usr_is_untouched():
    name = f"agt-test-{os.getpid()}"
    with Sandbox(writable=["/usr/bin/find"]) as box:
        assert box.usr == "overlay"
        out = box.shell(
            f"echo hi > /usr/local/bin/{name} && cat /usr/local/bin/{name}; echo top > /usr/{name}.log && "
            "echo top-ok; chmod u+s /usr/bin/find && stat -c '%A %U' /usr/bin/find; "
            "chmod u+s /usr/bin/ls 2>&1 | sed 's/.*: //'; stat -c %U /usr/bin/ls; "
            "find / -name no-such-file 2>&1 | grep -c 'Permission denied'", timeout=60)["output"]
    assert out.split("\n")[:-1] == ["hi", "top-ok", "-rwsr-xr-x root",  # copied up: root's
                                    "Operation not permitted", "nobody",  # other host files
                                    "0"]  # unreadable host dirs are covered: find / stays quiet
    assert not os.path.exists(f"/usr/local/bin/{name}") and not os.path.exists(f"/usr/{name}.log")
    assert not os.stat("/usr/bin/find").st_mode & 0o4000


def test_single_uid_mode_runs_root_only_tasks_and_skips_the_others(bench_data):
    single = envs.load("os", str(bench_data / "agentbench/os_dev.json"), uid_mode="single")
    assert single.id_plan.mode == "single" and not single.id_plan.multi_uid
    assert set(single.skipped) == {"18", "19", "20", "24"}
    assert single.skipped["24"] == ("needs users other than root (useradd, chown, su), but the sandbox "
                                    "maps a single uid here: uid_mode=single was asked for: one uid "
                                    "inside the sandbox")
    for tid in ("6", "3"):  # a question, and a check script over a command the agent installs
        assert envs.run_episode(single, tid).reward == 1.0
    single.reset("6")
    out = single.box.shell("cat /proc/self/uid_map /proc/self/setgroups; useradd -m bob; su - bob -c id")
    single.close()
    lines = out["output"].split("\n")
    assert lines[0].split()[0::2] == ["0", "1"]  # inside 0, one id
    assert lines[1:3] == ["deny", "su: cannot set groups: Operation not permitted"]


def test_id_plans():
    assert sandbox_idmap.read_subids("/nonexistent", ["x"]) is None
    with pytest.raises(ValueError, match="uid_mode must be one of"):
        sandbox_idmap.static_plan("rootless")
    plan = sandbox_idmap.static_plan("auto")
    if os.geteuid() == 0:  # CI: a fresh 65536-id range per sandbox, never the host's root
        uids, gids = plan.maps()
        assert plan.mode == "range" and len(uids) == 1 and uids[0][0] == 0 and uids[0][2] == 65536
        assert uids[0][1] >= 1 << 20 and gids == uids
        one = sandbox_idmap.static_plan("single").maps()[0]
        assert len(one) == 1 and one[0][2] == 1 and one[0][1] >= 1 << 20
    else:
        assert plan.mode in ("subid", "single")
        with pytest.raises(ValueError, match="needs root"):
            sandbox_idmap.static_plan("range")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare "
                    "to mask /proc in a private mount namespace")
def test_a_masked_proc_is_diagnosed():
    """Container runtimes mask parts of /proc; the kernel then refuses the sandbox a new procfs.
    The error names the cause and the fix (simulated: /proc/keys covered, as runc does)."""
    code = ("from serve.envs.sandbox import Sandbox, SandboxUnavailable\n"
            "try:\n    Sandbox()\nexcept SandboxUnavailable as exc:\n    print(exc)\n")
    res = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind /dev/null /proc/keys && exec "$0" -c "$1"',
                          sys.executable, code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    assert "Can't mount proc" in res.stdout and "procMount: Unmasked or privileged" in res.stdout, res
