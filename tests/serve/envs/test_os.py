"""OS environment on AgentBench's real OS tasks (dev list, standard layout), in real sandboxes."""

import json
import shutil

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
    return envs.load("os", str(bench_data / "agentbench/os_dev.json"))  # command_timeout 10 s


def test_dev_ids_splits_and_script_files(env, bench_data):
    assert env.tasks() == [str(i) for i in range(26)] and env.skipped == {}
    assert env.splits() == {"dev": env.tasks()}
    scripts = bench_data / "agentbench/os_scripts/dev"
    calc = env.specs["3"]  # check/0.sh + example/0.sh, both files
    assert calc.check[0].source == str(scripts / "check/0.sh") and "calc" in calc.check[0].code
    assert calc.example.source == str(scripts / "example/0.sh")
    assert env.specs["25"].init[0].source == str(scripts / "init/stock-log.sh")
    assert env.specs["6"].check[1].source == str(scripts / "check/integer-match.py")
    assert env.specs["6"].check[1].language == "python" and env.specs["6"].check[0] is None


def test_std_layout_ids_splits_and_scripts(env, bench_data):
    std = envs.load("os", str(bench_data / "agentbench/os_std"))
    ids = std.tasks()
    assert len(ids) == 144 and len(set(ids)) == 144 and std.skipped == {}
    assert std.splits() == {"std": ids}
    per_folder = {n: sum(t.startswith(f"std-00{n}-") for t in ids) for n in range(1, 8)}
    assert per_folder == {1: 7, 2: 5, 3: 6, 4: 19, 5: 10, 6: 9, 7: 88}
    assert ids[:2] == ["std-001-stock-00000", "std-001-stock-00001"] and "std-004-N41-00002" in ids
    calc = std.specs["std-005-new-00000"]
    assert calc.check[0].source == str(bench_data / "agentbench/os_scripts/5/checking/0.sh")
    assert calc.example.source == str(bench_data / "agentbench/os_scripts/5/example/0.sh")
    assert std.specs["std-002-environment-00002"].init[0].source.endswith("os_scripts/2/init/nested_folders.sh")
    # one file of the layout, or one numbered folder, gives the same ids
    one = envs.load("os", str(bench_data / "agentbench/os_std/4/N41.json"))
    assert one.tasks() == [f"std-004-N41-{i:05d}" for i in range(4)] and list(one.splits()) == ["std"]
    folder = envs.load("os", str(bench_data / "agentbench/os_std/5"))
    assert folder.tasks() == [f"std-005-new-{i:05d}" for i in range(10)]
    with pytest.raises(envs.EnvError, match="unknown split 'test'"):
        std.tasks("test")


def test_expert_solves_every_dev_task_but_the_unscorable_one(env):
    episodes = {tid: envs.run_episode(env, tid) for tid in env.tasks()}
    failed = {tid for tid, ep in episodes.items() if ep.reward != 1.0}
    # dev 8 asks for `du -sh /home` ("4.0K"): AgentBench's size-match.py does int("4.0") on the
    # expected output and crashes, so no answer can pass (in AgentBench either)
    assert failed == {"8"}, {t: episodes[t].info for t in failed}
    info = episodes["8"].info
    assert info["expected"] == "4.0K\n" and info["checks"][0]["source"] == "example"
    assert "invalid literal for int() with base 10: '4.0'" in info["checks"][1]["output"]
    assert all(ep.status == envs.Status.COMPLETED for ep in episodes.values())
    calc = episodes["3"]  # a check script that tests the command the example installed
    assert "mv calc /usr/local/bin/" in calc.messages[-4]["content"]
    assert calc.messages[-2]["content"].endswith("Act: finish") and calc.info["checks"][0]["rc"] == 0


def test_wrong_answers_fail(env):
    for tid in ["0", "6", "14", "22"]:  # match, integer, integer over groups, string
        env.reset(tid)
        r = env.step("Think: a guess.\n\nAct: answer(999999)")
        assert r.done and r.status == envs.Status.COMPLETED and r.reward == 0.0, tid
    env.reset("3")  # a check-script task whose command does not exist yet
    r = env.step("Think: done.\n\nAct: finish")
    assert r.reward == 0.0 and r.info["answer"] is None and r.info["checks"][0]["rc"] != 0


def test_protocol_details(env):
    msgs = env.reset("6")
    assert msgs[0]["content"].startswith("You are an assistant that will act like a person")
    assert msgs[-1]["content"].endswith("How many hidden files are in /home? (not including subdirectories)")
    assert [m.get("loss", True) for m in msgs if m["role"] == "assistant"] == [False] * 3
    r = env.step("Think: look.\n\nAct: bash\n\n```bash\nseq 1 1000\n```")
    assert r.observation.startswith("The output of the OS:\n\n1\n2\n")
    assert r.observation.endswith("\n[truncated because the output is too long]")
    # AgentBench keeps 780 characters and appends the note
    note = "\n[truncated because the output is too long]"
    assert len(r.observation) == len("The output of the OS:\n\n") + 780 + len(note)
    r = env.step("Think: nothing.\n\nAct: bash\n\n```bash\ntrue\n```")
    assert r.observation == "The output of the OS is empty."
    r = env.step("Think: where am I.\n\nAct: bash\n\n```bash\npwd; echo $HOME\n```")
    assert r.observation == "The output of the OS:\n\n/\n/root\n"  # AgentBench's images: cwd /
    r = env.step("Think: no block.\n\nAct: bash")  # AgentBench sends the empty command
    assert r.observation == "The output of the OS is empty." and not r.done
    r = env.step("I am not sure what to do")
    assert r.done and r.status == envs.Status.INVALID_FORMAT
    assert parse_action("Act: bash\n```bash\nls\n```\nAct: answer(3)") == {"action": "answer", "content": "3"}
    assert parse_action("Act: answer 3\nAct: finish") == {"action": "finish", "content": None}


def test_named_checkers_follow_agentbench_scripts():
    # check() mirrors check/*.py for judging outside a sandbox (pipelines.derive)
    assert check("integer-match", " 7", "7\n") and not check("integer-match", "7.0", "7")
    assert check("string-match", "installed\r\n", "installed") and not check("string-match", "a b", "a  b")
    assert check("size-match", "4K", "4096") and check("size-match", "1G", "1024M")
    assert not check("size-match", "4.0K", "4K")  # int() only, as size-match.py
    assert not check("size-match", "4KB", "4KB")  # "B" is tried first: int("4K") fails there
    assert check("containing", "the answer is 42", "42\n") and not check("containing", "4", "42")
    assert check("in", "42", "answer: 42") and not check("in", "43", "answer: 42")


def test_start_code_runs_in_the_agents_shell(bench_data):
    std = envs.load("os", str(bench_data / "agentbench/os_std/4"), command_timeout=5.0)
    shown = {}
    for tid in ("std-004-Q49-00000", "std-004-N4-00000", "std-004-Q47-00000"):
        std.reset(tid)
        shown[tid] = std.step('Think: look.\n\nAct: bash\n\n```bash\necho "$var|$(whoami)|$(pwd)"\n```').observation
        std.close()
    assert shown == {"std-004-Q49-00000": "The output of the OS:\n\n3.14|root|/\n",  # var=3.14
                     "std-004-N4-00000": "The output of the OS:\n\n|jack|/home/jack\n",  # su - jack
                     "std-004-Q47-00000": "The output of the OS:\n\n|root|/home/user2\n"}  # cd


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def test_check_scripts_are_invoked_like_agentbench(tmp_path):
    """Chain: each script gets the answer and the earlier outputs as arguments, cwd /, stderr
    in the output, exit code = pass; the example (null) runs in the episode's sandbox."""
    _write(tmp_path / "os_scripts/mine/check/args.sh", 'printf "sh:%s|%s\\n" "$#" "$1"; test "$1" = 42\n')
    _write(tmp_path / "os_scripts/mine/init/setup.py", "open('/root/made', 'w').write('x')\n")
    verify = ("import os, sys\nok = (sys.argv[1:3] == ['42', 'ex:42:/:x\\nwarn\\n'] and "
              "sys.argv[3] == 'sh:2|42\\n' and os.getcwd() == '/')\nsys.exit(0 if ok else 1)")
    _write(tmp_path / "os_mine.json", [
        {"description": "chain", "create": {"init": {"file": "init/setup.py", "language": "python"}},
         "evaluation": {"check": [None, {"file": "check/args.sh"}, {"language": "python", "code": verify}],
                        "example": 'echo "ex:$1:$(pwd):$(cat /root/made)"; echo warn >&2'}},
        {"description": "missing", "evaluation": {"check": {"file": "check/nope.sh"}}},
        {"description": "no example", "evaluation": {"check": [None, {"file": "check/args.sh"}]}},
        {"description": "odd language", "evaluation": {"check": {"language": "c++", "code": "int main(){}"}}},
    ])
    e = envs.load("os", str(tmp_path / "os_mine.json"))
    assert e.tasks() == ["0"]
    assert e.skipped == {
        "1": f"evaluation.check file 'check/nope.sh' not found in {tmp_path / 'os_scripts/mine'}",
        "2": "evaluation.check has a null entry (the example's output) but there is no evaluation.example",
        "3": "evaluation.check is in language 'c++'; supported: bash, python"}
    e.reset("0")
    r = e.step("Think: x.\n\nAct: answer(42)")
    assert r.reward == 1.0 and [c["rc"] for c in r.info["checks"]] == [0, 0, 0], r.info
    assert r.info["expected"] == "ex:42:/:x\nwarn\n"
    e.reset("0")
    r = e.step("Think: x.\n\nAct: finish")  # finish answers None: the scripts get "None"
    assert r.reward == 0.0 and r.info["checks"][0]["output"] == "ex:None:/:x\nwarn\n"
    assert [c["rc"] for c in r.info["checks"]] == [0, 1]


def test_scripts_folder_resolution(tmp_path, bench_data):
    rec = {"description": "q", "evaluation": {"check": [None, {"language": "python", "file": "check/integer-match.py"}],
                                              "example": "echo 3"}}
    own = {"description": "q", "evaluation": {"check": {"file": "check/0.sh"}}}
    _write(tmp_path / "tasks.json", [rec, own])
    e = envs.load("os", str(tmp_path / "tasks.json"))
    # AgentBench's named checkers need no scripts folder (the shipped copies); others do
    assert e.tasks() == ["0"]
    assert e.specs["0"].check[1].source == str(bench_data / "agentbench/os_scripts/dev/check/integer-match.py")
    assert e.skipped["1"].startswith("evaluation.check file 'check/0.sh' not found (no scripts folder "
                                     f"for {tmp_path / 'tasks.json'}: looked in {tmp_path / 'os_scripts/tasks'}")
    assert e.skipped["1"].endswith("; pass the option scripts_dir)")
    e = envs.load("os", str(tmp_path / "tasks.json"), scripts_dir=str(bench_data / "agentbench/os_scripts/dev"))
    assert e.tasks() == ["0", "1"] and e.specs["1"].check[0].source.endswith("os_scripts/dev/check/0.sh")
    # AgentBench's own layout: data/<N>/*.json beside scripts/<N>/
    _write(tmp_path / "ab/data/3/x.json", own)
    shutil.copytree(bench_data / "agentbench/os_scripts/dev", tmp_path / "ab/scripts/3")
    e = envs.load("os", str(tmp_path / "ab/data"))
    assert e.tasks() == ["std-003-x-00000"] and e.specs["std-003-x-00000"].check[0].source == \
        str(tmp_path / "ab/scripts/3/check/0.sh")
    with pytest.raises(envs.EnvError, match="option 'uid_mode' must be one of"):
        envs.load("os", str(tmp_path / "tasks.json"), uid_mode="rootless")


def test_bad_records_are_skipped_with_reasons(tmp_path):
    p = tmp_path / "os.json"
    p.write_text('[{"description": "ok?", "evaluation": {"match": "1"}}, {"evaluation": {"match": "1"}},'
                 ' {"description": "x"}, {"description": "y", "evaluation": {"match": 3}}, 7]')
    e = envs.load("os", str(p))
    assert e.tasks() == ["0"]
    assert e.skipped == {"1": "missing field 'description'",
                         "2": "field 'evaluation' needs 'match' or 'check'",
                         "3": "evaluation.match must be a string or an object with 'answer' or 'regex'",
                         "4": "record is not an object"}
    with pytest.raises(envs.UnknownTask, match="skipped at load"):
        e.reset("1")
    (tmp_path / "bad.json").write_text('{"description": ')
    with pytest.raises(envs.EnvError, match="cannot read tasks from"):
        envs.load("os", str(tmp_path / "bad.json"))
