"""Bad input gets one clear sentence and a non-zero exit; configs load, override and round-trip."""

import pytest
import torch

from multitask import config as configlib
from multitask.errors import UserError
from multitask.training.teacher import TeacherConfig, load_config


def test_unknown_game_exits_2_and_lists_known_games(run_cli, tmp_path):
    code, out, err = run_cli("teacher", "train", "minatar/Pacman", "--out", tmp_path / "x.pt")
    assert code == 2
    assert "unknown game 'minatar/Pacman'" in err and "minatar/SpaceInvaders" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_unknown_config_key_is_named(run_cli, tmp_path):
    code, _, err = run_cli("teacher", "train", "minatar/Breakout", "learning_rate=3", "--out", tmp_path / "x.pt")
    assert code == 2 and "unknown config key 'learning_rate'" in err
    code, _, err = run_cli("teacher", "train", "minatar/Breakout", "dqn.momentum=3", "--out", tmp_path / "x.pt")
    assert code == 2 and "unknown config key 'dqn.momentum'" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("total_steps = 10\nwarmup = 3\n")
    code, _, err = run_cli("teacher", "train", "minatar/Breakout", "--config", bad, "--out", tmp_path / "x.pt")
    assert code == 2 and "unknown config key 'warmup'" in err and str(bad) in err


def test_overrides_after_flags_are_overrides_and_stray_words_are_refused(run_cli, tmp_path):
    # key=value after a flag still reaches the config (the unknown key proves it was parsed as one)
    code, _, err = run_cli("teacher", "train", "minatar/Breakout", "--out", tmp_path / "x.pt", "learning_rate=3")
    assert code == 2 and "unknown config key 'learning_rate'" in err
    code, _, err = run_cli("teacher", "train", "minatar/Breakout", "--out", tmp_path / "x.pt", "stray")
    assert code == 2 and "multitask teacher train: error: unrecognized arguments: stray" in err  # the command's usage
    code, _, err = run_cli("evaluate", tmp_path / "x.pt", "lr=3")
    assert code == 2 and "unrecognized arguments: lr=3" in err


def test_ill_typed_values_are_refused(run_cli, tmp_path):
    code, _, err = run_cli("teacher", "train", "minatar/Breakout", "total_steps=many", "--out", tmp_path / "x.pt")
    assert code == 2 and "'total_steps'" in err and "int" in err
    code, _, err = run_cli("teacher", "train", "minatar/Breakout", "num_envs=0", "--out", tmp_path / "x.pt")
    assert code == 2 and "num_envs" in err


def test_evaluate_missing_corrupt_and_foreign_checkpoints(run_cli, tmp_path):
    code, _, err = run_cli("evaluate", tmp_path / "missing.pt")
    assert code == 2 and "does not exist" in err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 broken zip")
    code, _, err = run_cli("evaluate", corrupt)
    assert code == 2 and "corrupt" in err and "Traceback" not in err
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": torch.zeros(1)}, foreign)
    code, _, err = run_cli("evaluate", foreign)
    assert code == 2 and "not a multitask agent checkpoint" in err


def test_import_rejects_non_atari_games_and_unwritable_outputs(run_cli, tmp_path):
    f = tmp_path / "m.cleanrl_model"
    f.write_bytes(b"x")
    code, _, err = run_cli("teacher", "import", "cleanrl", f, "--game", "minatar/Breakout")
    assert code == 2 and "not an Atari game" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli("teacher", "import", "cleanrl", f, "--game", "atari/Pong", "--out", blocker / "x.pt")
    assert code == 2 and "cannot write" in err


def test_layering_defaults_toml_overrides(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text("total_steps = 1_000\n[dqn]\nlr = 0.5\n")
    cfg = configlib.load(TeacherConfig, toml, ["dqn.batch_size=7", "seed=4"])
    assert cfg.total_steps == 1000 and cfg.dqn.lr == 0.5 and cfg.dqn.batch_size == 7 and cfg.seed == 4
    assert cfg.dqn.gamma == 0.99  # untouched default
    again = configlib.load(TeacherConfig, None, [], data=configlib.read_toml(_write(tmp_path, configlib.to_toml(cfg))))
    assert again == cfg


def test_a_nested_tables_own_default_is_kept_under_overrides():
    # StudyConfig.counter_train's default differs from TabularConfig(): overriding one key keeps the rest
    from multitask.training.gridworld_studies import StudyConfig
    from multitask.training.tabular import TabularConfig

    default = StudyConfig().counter_train
    assert default != TabularConfig()
    assert configlib.load(StudyConfig).counter_train == default
    cfg = configlib.load(StudyConfig, None, ["counter_train.lr=0.3"])
    assert cfg.counter_train.lr == 0.3 and cfg.counter_train.updates == default.updates
    assert cfg.counter_train.optimizer == default.optimizer and cfg.train == TabularConfig()
    with pytest.raises(UserError, match="must be a table"):
        configlib.load(StudyConfig, None, ["counter_train=3"])


def test_suite_presets_load_and_differ():
    atari, minatar = load_config("atari", None, []), load_config("minatar", None, [])
    assert atari.replay_capacity == 1_000_000 and minatar.replay_capacity == 100_000
    assert atari.dqn.reward_clip and not minatar.dqn.reward_clip


def test_bad_literal_and_bool():
    with pytest.raises(UserError, match="must be bool"):
        configlib.load(TeacherConfig, None, ["keep_best=maybe"])


def _write(tmp_path, text):
    p = tmp_path / "round.toml"
    p.write_text(text)
    return p


def test_config_lists_a_nested_tables_own_defaults_under_its_doc(run_cli):
    """A study's [counter_train] is not TabularConfig()'s defaults: `config` shows the field's own."""
    code, out, _ = run_cli("config", "gridworld")
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert code == 0 and "plain SGD" in rows["[counter_train]"]
    assert "'sgd'" in rows["counter_train.optimizer"] and " 8000 " in rows["counter_train.updates"]
    assert "'adam'" in rows["train.optimizer"]  # the other table keeps TabularConfig's


def test_every_command_familys_config_is_listed(run_cli):
    from multitask.config import CONFIG_CLASSES

    assert {"pipeline", "sweep"} <= set(CONFIG_CLASSES)
    for what in CONFIG_CLASSES:
        code, out, err = run_cli("config", what)
        assert code == 0 and not err and len(out.splitlines()) >= 5, what
    code, out, _ = run_cli("config", "pipeline")
    assert {"dataset_overrides", "episodes", "baseline.overrides"} <= {line.split()[0] for line in out.splitlines()}


def test_an_existing_teacher_is_replaced_only_with_overwrite(run_cli, tmp_path, make_teacher):
    out = make_teacher(tmp_path / "B.pt", "minatar/Breakout")
    before = out.read_bytes()
    for command in (["train", "minatar/Breakout", "total_steps=64", "--run-dir", tmp_path / "run"],
                    ["import", "cleanrl", tmp_path / "model.pt", "--game", "atari/Pong"]):
        code, _, err = run_cli("teacher", *command, "--out", out)
        assert code == 2 and "already holds a teacher; pass --overwrite" in err and err.count("\n") == 1, err
    assert out.read_bytes() == before and not (tmp_path / "run").exists()


def test_list_overrides_read_each_item_as_a_value():
    from multitask.training.gridworld_studies import StudyConfig

    assert configlib.load(StudyConfig, None, ["actions=4,4000"]).actions == (4, 4000)
    assert configlib.load(StudyConfig, None, ["actions=4"]).actions == (4,)
    assert configlib.load(StudyConfig, None, ["temperatures=[0.1, 1]"]).temperatures == (0.1, 1.0)
    with pytest.raises(UserError, match="'actions' .* must be int, got 'four'"):
        configlib.load(StudyConfig, None, ["actions=four,4"])


def test_int_flags_read_numbers_as_overrides_do():
    from multitask.cli import build_parser

    for text in ("100000", "100_000", "1e5"):
        assert build_parser().parse_args(["dataset", "build", "minatar/Breakout", "--steps", text]).steps == 100_000
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dataset", "build", "minatar/Breakout", "--steps", "1.5"])
