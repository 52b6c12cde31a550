"""`agenttuning fetch-data alfworld-train --from ZIP`: exactly the listed games, from either archive layout."""

import json
import zipfile

import pytest

from agenttuning.paths import data_file
from pipelines.fetch_data import cli


@pytest.mark.parametrize("top", ["json_2.1.1", "json_2.1.2"])
def test_extracts_exactly_the_listed_games(tmp_path, top):
    wanted = json.load(open(data_file("alfworld/train_subset.json")))["train"]
    archive = tmp_path / "games.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i, w in enumerate(wanted):
            z.writestr(f"{top}/{w.split('/', 1)[1]}", f"game {i}")
        z.writestr(f"{top}/train/not-listed/trial_0/game.tw-pddl", "extra")
    assert cli(["alfworld-train", "--from", str(archive), "--dest", str(tmp_path / "out")]) == 0
    games = sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert len(games) == len(wanted) == 360
    first = tmp_path / "out" / "alfworld" / wanted[0]
    assert first.read_text() == "game 0"


def test_incomplete_archive_names_the_missing_game(tmp_path):
    archive = tmp_path / "games.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("json_2.1.1/train/x/y/game.tw-pddl", "x")
    with pytest.raises(SystemExit, match="360 of 360 games are not in"):
        cli(["alfworld-train", "--from", str(archive), "--dest", str(tmp_path / "out")])
