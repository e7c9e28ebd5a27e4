"""Agent checkpoints: round trip, cards, and every way a file can be wrong."""

import json

import pytest
import torch

from multitask.agents.checkpoints import card_path, check_agent_game, load_agent, load_teacher, save_agent
from multitask.files import file_sha256
from multitask.envs import get_game
from multitask.errors import UserError
from multitask.agents.networks import MultiHeadNet, teacher_network_spec


@pytest.fixture
def teacher(tmp_path):
    torch.manual_seed(0)
    net = MultiHeadNet(teacher_network_spec(get_game("minatar/Breakout")))
    path = tmp_path / "Breakout.pt"
    save_agent(path, net, "teacher", {"source": "test", "eval": {"mean": 1.0}})
    return net, path


def test_round_trip_gives_identical_outputs_and_card(teacher):
    net, path = teacher
    agent = load_agent(path)
    obs = torch.randint(0, 2, (5, 4, 10, 10), dtype=torch.uint8)
    assert torch.equal(net(obs), agent.net(obs))
    card = json.loads(card_path(path).read_text())
    assert card["sha256"] == file_sha256(path) == agent.sha256
    assert card["kind"] == "teacher" and card["network"]["games"] == ["minatar/Breakout"]
    assert agent.card["source"] == "test"


def test_checkpoint_for_another_game_is_refused(teacher):
    _, path = teacher
    with pytest.raises(UserError, match="no head for minatar/Asterix"):
        load_teacher(path, "minatar/Asterix")


def test_checkpoint_with_another_action_count_is_refused(tmp_path):
    spec = teacher_network_spec(get_game("minatar/Breakout"))
    wrong = MultiHeadNet(spec.__class__(spec.trunk, spec.games, (6,)))  # claims Breakout has 6 actions
    path = tmp_path / "wrong.pt"
    save_agent(path, wrong, "teacher", {})
    with pytest.raises(UserError, match="6 actions for minatar/Breakout, but the game has 3"):
        check_agent_game(load_agent(path), get_game("minatar/Breakout"))


def test_missing_corrupt_truncated_and_foreign_files(teacher, tmp_path):
    _, path = teacher
    with pytest.raises(UserError, match="does not exist"):
        load_agent(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(UserError, match="corrupt or not a torch file"):
        load_agent(garbage)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt"):
        load_agent(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"network.0.weight": torch.zeros(3)}, foreign)
    with pytest.raises(UserError, match="not a multitask agent checkpoint"):
        load_agent(foreign)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 5.7e36])
def test_checkpoint_with_non_finite_or_absurd_weights_is_refused(tmp_path, value):
    """A NaN, an infinity or a weight no training produces (5.7e36: what random bytes decode to)."""
    torch.manual_seed(0)
    net = MultiHeadNet(teacher_network_spec(get_game("minatar/Breakout")))
    with torch.no_grad():
        net.trunk.fcs[0].weight[3, 5] = value
    path = tmp_path / "bad.pt"
    save_agent(path, net, "teacher", {})
    with pytest.raises(UserError, match=r"bad\.pt holds .*trunk\.fcs\.0\.weight.*retrain"):
        load_agent(path)
