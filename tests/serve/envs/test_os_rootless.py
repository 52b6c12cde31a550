"""The OS environment without root. CI runs as root, so the test makes a throwaway unprivileged
user (with a /etc/subuid range: the rootless `subid` mode), runs real episodes as that user on a
copy of the code and the dev tasks, then takes the range away (the `single` fallback) and runs
again; the user is deleted afterwards. Run as a non-root user, the same script runs as that user.
"""

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile

import pytest

from serve.envs import sandbox_idmap
from serve.envs.sandbox import sandbox_python

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
pytestmark = pytest.mark.skipif(not shutil.which("bwrap"), reason="bubblewrap not installed")

SCRIPT = r"""
import json, sys
import serve.envs as envs
env = envs.load("os", "data/agentbench/os_dev.json", command_timeout=5.0)
out = {"plan": env.id_plan.mode, "note": env.id_plan.note, "skipped": env.skipped, "rewards": {}}
for tid in sys.argv[1].split(","):
    if tid in env.tasks():
        ep = envs.run_episode(env, tid)
        out["rewards"][tid] = [ep.reward, ep.status.value]
env.reset("6")
out["uid_map"] = env.box.shell("id -u; cat /proc/self/uid_map")["output"]
env.close()
print(json.dumps(out))
"""
# 6: hidden files (match via the example), 3: check script over an installed command,
# 18: useradd, 24: useradd + chown + su
TASKS = "6,3,18,24"


def _run(user, workdir):
    """Run SCRIPT as ``user`` (None: this process's user) in ``workdir``; its JSON output."""
    script = os.path.join(workdir, "rootless_episodes.py")
    with open(script, "w") as f:
        f.write(SCRIPT)
    os.chmod(script, 0o644)
    if user is None:
        argv = [sys.executable, script, TASKS]
    else:  # a clean environment: the user's own HOME, the system python (stdlib is enough)
        argv = ["runuser", "-u", user, "--", "env", "-i", "PATH=/usr/bin:/bin", f"HOME={workdir}",
                "LANG=C.UTF-8", sandbox_python(), script, TASKS]
    res = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _free_subid_start():
    end = 100000
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path) as f:
                for line in f:
                    parts = line.strip().split(":")
                    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                        end = max(end, int(parts[1]) + int(parts[2]))
        except OSError:
            pass
    return end


@pytest.fixture(scope="module")
def unprivileged():
    """(user name or None, work dir): a throwaway user and a copy of what it needs."""
    if os.geteuid() != 0:
        yield None, REPO
        return
    if not (shutil.which("useradd") and shutil.which("runuser") and sandbox_python()):
        pytest.skip("running as root without useradd/runuser or a /usr python: cannot make and "
                    "use a non-root user here")
    name = f"agtos{os.getpid()}"
    work = tempfile.mkdtemp(prefix="agt-rootless-", dir="/tmp")
    try:
        ignore = shutil.ignore_patterns("__pycache__")
        for pkg in ("serve", "agenttuning"):
            shutil.copytree(os.path.join(REPO, pkg), os.path.join(work, pkg), ignore=ignore)
        data = os.path.join(work, "data/agentbench")
        os.makedirs(data)
        shutil.copy(os.path.join(REPO, "data/agentbench/os_dev.json"), data)
        shutil.copytree(os.path.join(REPO, "data/agentbench/os_scripts/dev"), os.path.join(data, "os_scripts/dev"))
        subprocess.run(["chmod", "-R", "a+rX", work], check=True)
        os.chmod(work, 0o755)
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/bash", name], check=True,
                       capture_output=True)
        if sandbox_idmap.read_subids("/etc/subuid", [name]) is None:  # no automatic range here
            start = _free_subid_start()
            subprocess.run(["usermod", "--add-subuids", f"{start}-{start + 65535}",
                            "--add-subgids", f"{start}-{start + 65535}", name], check=True)
        yield name, work
    finally:
        uid = None
        try:
            uid = pwd.getpwnam(name).pw_uid
        except KeyError:
            pass
        subprocess.run(["userdel", name], capture_output=True)
        for path in ("/etc/subuid", "/etc/subgid"):  # userdel normally removes them already
            try:
                with open(path) as f:
                    lines = f.readlines()
                keep = [line for line in lines if line.split(":")[0] != name]
                if keep != lines:
                    with open(path, "w") as f:
                        f.writelines(keep)
            except OSError:
                pass
        shutil.rmtree(work, ignore_errors=True)
        if uid is not None:  # the sandbox template that user's runs cached in /tmp
            for entry in os.listdir(tempfile.gettempdir()):
                if entry.startswith(f"agt-sandbox-{uid}-"):
                    shutil.rmtree(os.path.join(tempfile.gettempdir(), entry), ignore_errors=True)


def test_episodes_as_an_unprivileged_user(unprivileged):
    user, work = unprivileged
    if user is not None and not sandbox_idmap.newidmap_tool("newuidmap"):
        pytest.skip("newuidmap/newgidmap not installed (Debian/Ubuntu package uidmap): the "
                    "rootless multi-uid mode cannot be tested; the single-uid test covers the rest")
    out = _run(user, work)
    uid_line = out["uid_map"].split("\n")[1].split()
    if out["plan"] == "subid":
        assert out["skipped"] == {}
        assert out["rewards"] == {t: [1.0, "completed"] for t in TASKS.split(",")}, out
        assert uid_line[0] == "0" and out["uid_map"].split("\n")[2].split()[:1] == ["1"]
        assert int(out["uid_map"].split("\n")[2].split()[2]) == 65535
    else:  # a non-root caller without a subuid range
        assert user is None and out["plan"] == "single"
    if user is not None:
        assert out["uid_map"].split("\n")[0] == "0" and uid_line[1] == str(pwd.getpwnam(user).pw_uid)


def test_single_uid_fallback_as_an_unprivileged_user(unprivileged):
    user, work = unprivileged
    if user is None:
        pytest.skip("not root: cannot take a /etc/subuid range away from this user")
    start = sandbox_idmap.read_subids("/etc/subuid", [user])
    gstart = sandbox_idmap.read_subids("/etc/subgid", [user])
    subprocess.run(["usermod", "--del-subuids", f"{start[0]}-{start[0] + start[1] - 1}",
                    "--del-subgids", f"{gstart[0]}-{gstart[0] + gstart[1] - 1}", user], check=True)
    out = _run(user, work)
    assert out["plan"] == "single" and f"no /etc/subuid range for user {user}" in out["note"]
    assert set(out["skipped"]) == {"18", "19", "20", "24"}
    assert out["skipped"]["18"].startswith("needs users other than root (useradd), but the sandbox "
                                           "maps a single uid here: only one uid can be mapped without root")
    assert out["rewards"] == {"6": [1.0, "completed"], "3": [1.0, "completed"]}
    assert out["uid_map"].split("\n")[1].split() == ["0", str(pwd.getpwnam(user).pw_uid), "1"]
