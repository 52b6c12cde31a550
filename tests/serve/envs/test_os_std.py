"""The scripted expert on AgentBench's standard OS split (144 tasks, os_std/{1..7}).

Default: a deterministic sample (a quick task of each folder, a check-script file, start code,
copy-up of /usr files, users, background init processes; dev's calc task in test_os.py covers
the other check-script style).
``-m slow``: all 144; measured on the shared 2-core dev machine: 137/144 in 164-221 s.
"""

import shutil

import pytest

import serve.envs as envs
from serve.envs.sandbox import Sandbox, SandboxUnavailable

pytestmark = pytest.mark.skipif(not shutil.which("bwrap"), reason="bubblewrap not installed")

T7 = "std-007-2023-06-07-00-13-14-"
SAMPLE = [
    "std-001-stock-00000", "std-002-environment-00000", "std-003-ac-00000", "std-004-Q19-00000",
    "std-005-new-00002",  # checking/2.sh tests the `date-format` the example installs in /usr/local/bin
    "std-006-new-00000", f"{T7}00002",
    "std-002-environment-00004",  # init from a script file plus inline code; bash check
    "std-004-Q47-00000",  # start `cd`, a three-script check chain that reads the answer
    "std-006-new-00003",  # init `chmod u+s /usr/bin/find`: a host file copied up, then fixed
    "std-006-new-00002",  # useradd x4, check with runuser
    f"{T7}00004",  # init leaves `sudo -u temp_student sleep 1000 &` running
]
# Tasks no expert (nor agent) passes here, and why. AgentBench itself scores the last four the
# same way; the first two depend on the host's /usr, which the sandbox shows.
KNOWN_FAILURES = {
    "std-005-new-00001": "checking/1.sh counts every file under /lib with a bash recursion that follows "
                         "symlinks: on a host with a large /usr/lib it outruns script_timeout",
    "std-005-new-00005": "`du -sh /usr` prints one decimal below 10 units (e.g. 5.9G) and AgentBench's "
                         "size-match.py parses integers only",
    f"{T7}00000": "the example counts processes; run as its own `bash -c` it sees one more than the shell",
    f"{T7}00075": "the example counts processes (as above)",
    f"{T7}00008": "`find` from / counts /proc, where the example's own processes add entries",
    f"{T7}00029": "`find .` from / counts /proc (as above)",
    f"{T7}00009": "`find . -exec cat` over the whole filesystem: error lines make the answer multi-line",
}


@pytest.fixture(scope="module")
def std(bench_data):
    try:
        Sandbox().close()
    except SandboxUnavailable as exc:
        pytest.skip(f"sandboxes unavailable here: {exc}")
    return envs.load("os", str(bench_data / "agentbench/os_std"), command_timeout=10.0)


def test_expert_passes_the_sample(std):
    results = {tid: envs.run_episode(std, tid) for tid in SAMPLE}
    failed = {tid: ep.info for tid, ep in results.items() if ep.reward != 1.0}
    assert not failed
    find = results["std-006-new-00003"]  # the check saw the fixed mode of the copied-up find
    assert "chmod u-s /usr/bin/find" in find.messages[-4]["content"] and find.info["checks"][0]["rc"] == 0
    moved = results["std-004-Q47-00000"]
    assert moved.info["answer"] == "/home/user1/os/linux/commands/MyPersonalComputer.config"
    assert results[f"{T7}00004"].info["expected"] == "5\n"  # all five sleeps were counted


def test_a_known_failure_fails_for_the_stated_reason(std):
    ep = envs.run_episode(std, f"{T7}00000")
    assert ep.reward == 0.0 and int(ep.info["expected"]) == int(ep.info["answer"]) + 1


@pytest.mark.slow
def test_expert_on_all_144_std_tasks(std):
    results = {tid: envs.run_episode(std, tid) for tid in std.tasks()}
    failed = {tid for tid, ep in results.items() if ep.reward != 1.0}
    assert len(results) == 144
    assert failed <= set(KNOWN_FAILURES), {t: results[t].info for t in failed - set(KNOWN_FAILURES)}
