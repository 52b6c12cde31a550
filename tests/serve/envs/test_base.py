"""The shared mechanics of serve.envs.base, on a small real Env subclass (counting game)."""

from typing import List

import pytest

import serve.envs as envs
from serve.envs.base import Env, InvalidAction, InvalidFormat, StepResult, Task, register


@register("count_test")
class CountEnv(Env):
    """Say numbers until the target; 'boom' raises inside the env; bad text is invalid_format."""

    default_max_turns = 4
    default_max_observation_chars = 60

    def load_tasks(self, path) -> List[Task]:
        self.skip("broken", "record has no target")
        return [Task("t3", 3, "dev"), Task("t2", 2, "test"), Task("broken", None)]

    def start(self, task):
        self.n = 0
        return [{"role": "user", "content": f"count to {task.data}"}]

    def act(self, action):
        if action == "boom":
            raise RuntimeError("backend died")
        if action == "long":
            return StepResult("x" * 500)
        if action == "jump":
            raise InvalidAction("you cannot jump")
        if not action.isdigit():
            raise InvalidFormat("say a number")
        self.n = int(action)
        if self.n == self.current.data:
            return StepResult("done", reward=1.0, done=True)
        return StepResult(f"at {self.n}")

    def expert_action(self):
        return str(self.n + 1)


def test_registry_and_splits():
    env = envs.load("count_test")
    assert env.tasks() == ["t3", "t2"]
    assert env.tasks("test") == ["t2"]
    assert env.splits() == {"dev": ["t3"], "test": ["t2"]}
    assert "no target" in env.skipped["broken"]
    with pytest.raises(envs.UnknownTask, match="skipped at load: record has no target"):
        env.reset("broken")
    with pytest.raises(envs.EnvError, match="unknown environment 'nope'"):
        envs.load("nope")
    with pytest.raises(envs.EnvError, match="bad options"):
        envs.load("count_test", bogus=1)


def test_expert_episode_and_history():
    ep = envs.run_episode(envs.load("count_test"), "t3")
    assert (ep.reward, ep.status, ep.turns) == (1.0, envs.Status.COMPLETED, 3)
    assert [m["role"] for m in ep.messages] == ["user"] + ["assistant", "user"] * 3


@pytest.mark.parametrize(
    "actions,status",
    [
        (["1", "2", "1", "2", "1"], envs.Status.TURN_LIMIT),
        (["1", "1", "1"], envs.Status.REPETITION),
        (["hello"], envs.Status.INVALID_FORMAT),
        (["jump"], envs.Status.INVALID_ACTION),
        (["boom"], envs.Status.TASK_ERROR),
    ],
)
def test_statuses(actions, status):
    env = envs.load("count_test")
    env.reset("t3")
    for a in actions:
        r = env.step(a)
        if r.done:
            break
    assert r.done and r.status == status and r.reward == 0.0
    with pytest.raises(envs.EpisodeOver):
        env.step("1")


def test_truncation_tolerance_abort_and_spawn():
    env = envs.load("count_test", max_invalid=1)
    env.reset("t3")
    r = env.step("long")
    assert len(r.observation) == 60 and r.observation.endswith("too long]")
    r = env.step("hello")  # tolerated once: feedback, episode goes on
    assert not r.done and r.observation == "say a number"
    other = env.spawn()
    other.reset("t2")
    assert env.current.id == "t3" and other.current.id == "t2"
    r = env.abort(envs.Status.CONTEXT_LIMIT, "prompt too long")
    assert r.done and r.status == "context_limit"
    assert r.to_dict()["status"] == "context_limit"
    assert other.step("2").reward == 1.0
