"""ALFWorld on the paper's held-in split: AgentBench's std.json, 50 games (and the 20 dev games),
real game files and the real TextWorld engine; the walkthrough expert must win every game."""

import time

import pytest

pytest.importorskip("textworld")
pytest.importorskip("alfworld")

import serve.envs  # noqa: E402
from serve.envs.base import Status, run_episode  # noqa: E402

TASK_TYPES = {"pick_and_place_simple", "pick_clean_then_place_in_recep", "pick_heat_then_place_in_recep",
              "pick_cool_then_place_in_recep", "look_at_obj_in_light", "pick_two_obj_and_place"}


@pytest.fixture(scope="module")
def std(bench_data):
    e = serve.envs.load("alfworld", str(bench_data / "alfworld" / "agentbench_std.json"))
    yield e
    e.shutdown()


def test_std_split_is_agentbenchs_50_games(std, bench_data):
    assert len(std.tasks()) == 50 and std.splits().keys() == {"std"} and not std.skipped
    assert {t.split("-")[0] for t in std.tasks()} == TASK_TYPES
    dev = serve.envs.load("alfworld", str(bench_data / "alfworld" / "agentbench_dev.json"))
    assert dev.splits().keys() == {"dev"} and not set(dev.tasks()) & set(std.tasks())
    assert std.max_turns == 35 and std.repetition_k == 0  # AgentBench's max_step; its own repetition rule


def test_std_walkthrough_wins_one_game(std):
    tid = std.tasks()[-1]  # a pick_two_obj game: the longest walkthroughs
    ep = run_episode(std, tid)
    assert (ep.status, ep.reward) == (Status.COMPLETED, 1.0) and ep.turns == len(std._walkthrough)


def _sweep(env):
    t0 = time.monotonic()
    lost = {}
    for tid in env.tasks():
        ep = run_episode(env, tid)
        if ep.reward != 1.0 or ep.status != Status.COMPLETED:
            lost[tid] = (ep.status, ep.turns)
    return lost, time.monotonic() - t0


@pytest.mark.slow
def test_std_walkthroughs_win_all_50(std):
    lost, seconds = _sweep(std)
    print(f"alfworld std: {50 - len(lost)}/50 won in {seconds:.0f}s")
    assert not lost


@pytest.mark.slow
def test_dev_walkthroughs_win_all_20(bench_data):
    env = serve.envs.load("alfworld", str(bench_data / "alfworld" / "agentbench_dev.json"))
    try:
        lost, seconds = _sweep(env)
    finally:
        env.shutdown()
    print(f"alfworld dev: {20 - len(lost)}/20 won in {seconds:.0f}s")
    assert not lost
