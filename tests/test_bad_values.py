"""Values no run can use are refused up front, in one sentence (config __post_init__ checks and CLI
flag checks), and the values that mean something (0: off, 0 threads: torch's default) stay allowed."""

import json

import pytest

from multitask import config as configlib
from multitask.agents.dqn import DQNConfig
from multitask.data.build_config import DatasetConfig
from multitask.errors import UserError
from multitask.evaluation.compare import aggregates
from multitask.evaluation.entrants import resolve_teachers
from multitask.pipeline import PipelineConfig
from multitask.training import baseline, teacher
from multitask.training.driven import DrivenConfig
from multitask.training.gridworld_studies import StudyConfig
from multitask.training.student import StudentConfig

BREAKOUT = "games=minatar/Breakout"
PIPELINE = ["name=x", "games=minatar/Breakout", "baseline.config=configs/baseline/minatar.toml"]

CONFIG_CASES = [  # (load the config from these overrides, words of the refusal)
    *[("teacher", [o], w) for o, w in [
        ("seed=-1", "must not be negative"), ("num_threads=-1", "must not be negative"),
        ("learning_starts=-5", "must not be negative"), ("width=0", "width must be positive"),
        ("width=-1", "width must be positive"), ("eps_start=2", "in [0, 1]"), ("eps_end=-0.1", "in [0, 1]"),
        ("final_eval_episodes=0", "final_eval_episodes"), ("dqn.lr=-1", "lr and huber_delta"),
        ("dqn.huber_delta=0", "lr and huber_delta"), ("replay_capacity=0", "replay_capacity"),
        ("replay_capacity=31", "replay_capacity")]],
    ("teacher", ["eval_every=1000", "eval_episodes=0"], "eval_episodes when eval_every > 0"),
    *[("student", [BREAKOUT, o], w) for o, w in [
        ("seed=-1", "must not be negative"), ("num_threads=-1", "must not be negative"),
        ("final_eval_episodes=0", "final_eval_episodes"), ("eval_episodes=0", "eval_episodes"),
        ("window_batches=0", "window_batches"), ("games=minatar/Breakout,minatar/Breakout", "each game once"),
        # NaN passed `tau <= 0` and trained a NaN student to the end; width 0 or -1 built 1-unit layers
        ("tau=nan", "must be positive"), ("lr=nan", "must be positive"), ("tau=inf", "finite"),
        ("lr=inf", "finite"), ("width=nan", "finite"), ("conv_width=inf", "finite"),
        ("width=0", "width must be positive"), ("width=-1", "width must be positive"),
        ("conv_width=-1", "conv_width positive"), ("extra_fc=-1", "extra_fc 0 or more")]],
    *[("baseline", [BREAKOUT, o], w) for o, w in [
        ("total_steps_per_game=0", "total_steps_per_game"), ("total_steps_per_game=-1", "total_steps_per_game"),
        ("num_envs=0", "num_envs"), ("eval_episodes=0", "eval_episodes"), ("final_eval_episodes=0", "final_eval"),
        ("seed=-1", "must not be negative"), ("eps_start=2", "in [0, 1]")]],
    *[("driven", [BREAKOUT, o], w) for o, w in [
        ("gamma=1.5", "gamma must be in [0, 1]"), ("games=minatar/Breakout,minatar/Breakout", "each game once"),
        ("final_eval_episodes=0", "final_eval_episodes"), ("seed=-1", "must not be negative"),
        ("checkpoint_every=0", "checkpoint_every"), ("baseline_rate=-1", "baseline_rate"),
        ("teacher_share_decay_steps=-10", "teacher_share_decay_steps must not be negative"),
        ("teacher_share_decay_steps=1000", "which is 0"), ("eval_every=-1", "eval_every and log_every"),
        ("tau=nan", "finite"), ("lr=inf", "finite")]],
    ("driven", [BREAKOUT, "size=custom", "width=0"], "width must be positive"),
    # a share the variant ignores, and policy-gradient terms on trajectories only the teacher plays
    ("driven", [BREAKOUT, "variant=teacher_distill", "teacher_share=0.3"], "drop teacher_share"),
    *[("driven", [BREAKOUT, f"variant={v}", "teacher_share=1"], "no gradient")
      for v in ("entropy_regularised", "teacher_v_reward", "n_distill+R")],
    ("driven", [BREAKOUT, "follow=true", "follow_every=0"], "follow_every"),
    *[("gridworld", [o], w) for o, w in [
        ("mdps=0", "mdps"), ("mdps=-2", "mdps"), ("seed=-1", "seed"), ("grid.size=0", "[grid]: size and num_actions"),
        ("grid.noise=1.5", "probabilities"), ("grid.wall_prob=0.99", "at most 1"), ("train.lr=-1", "lr must be positive"),
        ("train.eval_every=0", "eval_every"), ("counter_train.gamma=2", "gamma must be in [0, 1]"),
        ("temperatures=-1", "must not be negative"), ("counter_temperature=-0.1", "must not be negative"),
        ("temperatures=", "at least one value"), ("counter_rewards=", "at least one value"),
        ("reach=1.5", "reach"), ("train.variant=n_distill", "train.variant is not read"),
        ("counter_train.variant=n_distill+R", "counter_train.variant is not read")]],
    *[("pipeline", [*PIPELINE, o], w) for o, w in [
        ("wandb=onlin", "must be one of 'off', 'offline', 'online'"), ("dataset_steps=-1", "dataset_steps"),
        ("episodes=1", "episodes at least 2")]],
]
LOADERS = {
    "teacher": lambda o: teacher.load_config("minatar", None, o),
    "student": lambda o: configlib.load(StudentConfig, None, o),
    "baseline": lambda o: baseline.load_config(None, o),
    "driven": lambda o: configlib.load(DrivenConfig, None, o),
    "gridworld": lambda o: configlib.load(StudyConfig, None, o),
    "pipeline": lambda o: configlib.load(PipelineConfig, None, o),
}


@pytest.mark.parametrize("what, overrides, words", CONFIG_CASES, ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_bad_config_values_are_refused_in_one_sentence(what, overrides, words):
    with pytest.raises(UserError, match=r"^[^\n]+$") as e:
        LOADERS[what](overrides)
    assert words in str(e.value)


@pytest.mark.parametrize("what, overrides", [
    ("teacher", ["eval_every=0", "eval_episodes=0", "num_threads=0", "learning_starts=0", "eps_start=0",
                 "eps_decay_steps=0"]),  # eval_every 0: no periodic evaluation, so no episodes for one
    ("student", [BREAKOUT, "eval_every=0", "num_threads=0", "seed=0", "loader_workers=0"]),
    ("baseline", [BREAKOUT, "eval_every=0", "num_threads=0", "eps_end=1"]),
    ("driven", [BREAKOUT, "gamma=0", "num_threads=0", "tau=0", "eval_every=0", "log_every=0"]),
    ("driven", [BREAKOUT, "variant=entropy_regularised", "teacher_share=1", "teacher_share_decay_steps=1000"]),
    ("driven", [BREAKOUT, "variant=on_policy_distill", "teacher_share=1"]),
    ("gridworld", ["grid.noise=0", "grid.size=1", "train.gamma=1", "temperatures=0", "reach=0",
                   "train.variant=on_policy_distill"]),
    ("pipeline", [*PIPELINE, "wandb=off", "episodes=2"]),
])
def test_values_that_mean_something_stay_allowed(what, overrides):
    LOADERS[what](overrides)


def test_the_dqn_and_dataset_dataclasses_check_their_own_ranges():
    for bad in (dict(lr=0.0), dict(huber_delta=-1.0)):
        with pytest.raises(ValueError, match="lr and huber_delta must be positive"):
            DQNConfig(**bad)
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\]"):
        DatasetConfig(epsilon=1.5)


def test_a_replay_too_small_for_a_games_frame_stacks_is_refused_before_training(tmp_path):
    cfg = teacher.load_config("atari", None, ["replay_capacity=100", "num_envs=8"])  # 4 frames per env: fine for MinAtar
    with pytest.raises(UserError, match="replay_capacity 100 is too small for 8 envs of atari/Pong; give at least 128"):
        teacher.train_teacher("atari/Pong", cfg, tmp_path / "T.pt", tmp_path / "run", wandb_mode="off",
                              show_progress=False)
    assert not (tmp_path / "run").exists()


CLI_CASES = [  # (arguments, words of the refusal); {t}: a real teacher checkpoint, {tmp}: a scratch folder
    (["evaluate", "{t}", "--episodes", 0], "--episodes 0"),
    (["evaluate", "{t}", "--episodes", -3], "--episodes -3"),
    (["evaluate", "{t}", "--seed", -1], "--seed -1"),
    (["evaluate", "{t}", "--epsilon", 2], "not a probability"),
    (["evaluate", "{t}", "--epsilon", -1], "not a probability"),
    (["dataset", "verify", "{tmp}/d.h5", "--teacher", "{t}", "--sample", 0], "--sample 0"),
    (["dataset", "verify", "{tmp}/d.h5", "--teacher", "{t}", "--sample", -5], "--sample -5"),
    (["teacher", "import", "cleanrl", "{tmp}/model", "--game", "atari/Pong", "--episodes", -1], "--episodes -1"),
    (["compare", "{t}", "--out", "{tmp}/c", "--bootstrap-reps", 0, "--wandb", "off"], "--bootstrap-reps 0"),
    (["compare", "{t}", "--out", "{tmp}/c", "--seed", -1, "--wandb", "off"], "--seed -1"),
    (["gridworld", "control", "--mdps", 0, "--out", "{tmp}/g"], "mdps"),
    (["gridworld", "control", "--mdps", -2, "--out", "{tmp}/g"], "mdps"),
    (["teacher", "train", "minatar/Breakout", "final_eval_episodes=0", "--run-dir", "{tmp}/run", "--out",
      "{tmp}/T.pt", "--wandb", "off"], "final_eval_episodes"),
]


@pytest.mark.parametrize("args, words", CLI_CASES, ids=lambda x: x if isinstance(x, str) else " ".join(map(str, x[:2] + x[-2:])))
def test_bad_flags_exit_2_with_one_sentence_before_any_work(args, words, run_cli, make_teacher, tmp_path):
    t = make_teacher(tmp_path / "t.pt", "minatar/Breakout")
    code, _, err = run_cli(*[str(a).format(t=t, tmp=tmp_path) for a in args])
    assert code == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.pt"]  # nothing written


def test_a_resumed_dataset_refuses_other_compression_settings(tmp_path, run_cli, make_teacher, monkeypatch):
    """A resumed file keeps its compression (DatasetWriter.resume): a different one asked for is refused,
    the same one (or none) is not."""
    from multitask.data import reader

    t = make_teacher(tmp_path / "t.pt", "minatar/Breakout")
    out = tmp_path / "d.h5"
    out.write_bytes(b"")  # stands for a gzip-1 dataset (its root attributes below)
    kept = {"frames": "gzip", "level": 1, "frame_chunk": 64, "step_chunk": 16384, "temporary": False}
    monkeypatch.setattr(reader, "root_attrs", lambda path: {"compression": json.dumps(kept)})
    base = ["dataset", "build", "minatar/Breakout", "--teacher", t, "--out", out, "--steps", 10, "--resume"]
    for extra, changed in ((["--compression", "lzf"], "compression"), (["--level", 4], "level"),
                           (["frame_chunk=16"], "frame_chunk")):
        code, _, err = run_cli(*base, *extra)
        assert code == 2 and f"cannot change {changed}" in err and err.count("\n") == 1, err
    import multitask.data.build as build

    monkeypatch.setattr(build, "build_many", lambda jobs, *a: [])  # the same settings pass the check
    code, _, err = run_cli(*base, "--compression", "gzip", "--level", 1)
    assert code == 0, err


def test_a_teacher_of_no_compared_game_is_left_out_with_a_note_and_the_report_stays_json(tmp_path, make_teacher):
    seaquest = make_teacher(tmp_path / "Seaquest.pt", "minatar/Seaquest")
    column, notes = resolve_teachers(["minatar/Breakout"], [seaquest])
    assert column.games == []
    assert any("plays minatar/Seaquest, not a compared game" in n for n in notes)
    assert any("minatar/Breakout has no teacher" in n for n in notes)
    empty = aggregates({}, {}, {}, reps=10, seed=0)  # the teacher column then has no game
    assert empty["geomean_pct_teacher"] is None and empty["mean_pct_teacher"] is None
    json.dumps(empty, allow_nan=False)
