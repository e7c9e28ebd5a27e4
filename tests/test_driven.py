"""Student-driven distillation on a real MinAtar game: every variant trains with finite losses, the
run's outputs, exact resume after a kill, bad configs."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from multitask import config as configlib
from multitask.agents.checkpoints import load_agent, save_agent
from multitask.agents.sizes import sized_network
from multitask.errors import UserError
from multitask.training import unified as u
from multitask.training.baseline import resolve_games
from multitask.training.driven import Driven, DrivenConfig, train_driven

GAME = "minatar/Breakout"
TINY = ["size=custom", "width=0.25", "num_envs=4", "rollout=8", "eval_workers=1", "eval_episodes=2",
        "final_eval_episodes=2", "log_every=64"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, make_teacher):
    return make_teacher(tmp_path_factory.mktemp("t") / "Breakout.pt", GAME, seed=1)


def _cfg(teacher: Path, *extra: str) -> DrivenConfig:
    return configlib.load(DrivenConfig, None, [f"games={GAME}", f"teachers={teacher}", *TINY, *extra])


@pytest.mark.parametrize("variant", [v for v in u.VARIANTS if not u.VARIANTS[v].value_gate] + ["n_distill+R"])
def test_every_variant_trains_with_finite_losses(tmp_path, teacher, variant):
    cfg = _cfg(teacher, f"variant={variant}", "total_steps_per_game=64", "eval_every=64", "checkpoint_every=64")
    summary = train_driven(cfg, tmp_path / "run", wandb_mode="off", show_progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x[f"train/{GAME}/loss"] for x in lines if f"train/{GAME}/loss" in x]
    assert losses and all(math.isfinite(v) for v in losses)
    assert summary["env_steps"] == 64 and summary["updates"] == 2 * 4 and summary["kind"] == "student-driven"
    best = load_agent(tmp_path / "run" / "best.pt")
    assert best.kind == "student" and best.net.games == (GAME,)
    assert all(torch.isfinite(p).all() for p in best.net.parameters())


def test_summary_table_and_a_mixture_schedule(tmp_path, teacher):
    cfg = _cfg(teacher, "teacher_share=0.5", "teacher_share_decay_steps=64", "total_steps_per_game=128", "log_every=32",
               "eval_every=64", "checkpoint_every=64")
    train_driven(cfg, tmp_path / "run", wandb_mode="off", show_progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shares = [x["train/teacher_share"] for x in lines if "train/teacher_share" in x]
    # each logged share is the one the rollout before it was played at: 0.5 at steps 0-31, 0.25 at 32-63, then 0
    assert shares == pytest.approx([0.5, 0.25, 0.0, 0.0])
    table = (tmp_path / "run" / "table.md").read_text()
    assert "Student-driven student (expected_entropy_regularised)" in table and "128 teacher-labelled" in table


def test_bad_configs_are_refused(tmp_path, teacher, monkeypatch):
    for words, message in ((["variant=value_gated_on_policy_distill"], "no value head"),
                           (["variant=teacher_distill+R"], "student's own trajectories"),
                           (["variant=dagger"], "unknown distillation variant"),
                           (["teacher_share=1.5"], "probability")):
        with pytest.raises(UserError, match=message):
            _cfg(teacher, *words)
    with pytest.raises(UserError, match="which `teachers` lists"):
        train_driven(configlib.load(DrivenConfig, None, [f"games={GAME}", "teachers=missing.pt", *TINY]),
                     tmp_path / "x", wandb_mode="off", show_progress=False)
    monkeypatch.chdir(tmp_path)  # no teachers/<suite>/<Game>.pt, the default, here
    with pytest.raises(UserError, match="needs one to label"):
        train_driven(configlib.load(DrivenConfig, None, [f"games={GAME}", *TINY]),
                     tmp_path / "x", wandb_mode="off", show_progress=False)


def _cli(run_dir: Path, teacher: Path) -> list[str]:
    return [sys.executable, "-m", "multitask", "student", "drive", f"games={GAME}", f"teachers={teacher}", *TINY,
            "variant=expected_entropy_regularised+R", "total_steps_per_game=512", "eval_every=256",
            "checkpoint_every=128", "device=cpu", "--run-dir", str(run_dir), "--wandb", "off", "--no-progress"]


@pytest.mark.slow
def test_a_resume_with_another_teacher_file_is_refused(tmp_path, make_teacher):
    """The teacher labels every state a driven student learns from: a run resumed after its teacher
    file was replaced trained on in silence under the old run's name. The summary names the files."""
    path = make_teacher(tmp_path / "Breakout.pt", GAME, seed=1)
    cfg = _cfg(path, "total_steps_per_game=32", "eval_every=32", "checkpoint_every=32")
    summary = train_driven(cfg, tmp_path / "run", wandb_mode="off", show_progress=False)
    assert summary["teachers"] == {GAME: {"path": str(path), "sha256": load_agent(path).sha256}}
    make_teacher(path, GAME, seed=2)  # another teacher at the same path
    with pytest.raises(UserError, match="other settings \\(teachers"):
        train_driven(replace(cfg, total_steps_per_game=64), tmp_path / "run", wandb_mode="off", show_progress=False)


@pytest.mark.slow
def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, teacher):
    straight = subprocess.run(_cli(tmp_path / "straight", teacher), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed, teacher), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up, as in a crash
    proc.wait()
    assert (killed / "state.pt").exists() and not (killed / "last.pt").exists()
    resumed = subprocess.run(_cli(killed, teacher), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {killed} after " in resumed.stderr
    a, b = load_agent(tmp_path / "straight" / "last.pt"), load_agent(killed / "last.pt")
    for (name, x), (_, y) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert torch.equal(x, y), name
    s, r = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "straight", killed))
    assert r["resumes"] == 1 and s["resumes"] == 0 and r["history"] == s["history"]


def test_a_following_student_reloads_a_changed_teacher(tmp_path, teacher, make_teacher):
    followed = tmp_path / "best.pt"
    save_agent(followed, load_agent(teacher).net, "teacher", {"source": "training", "env_steps": 1000})
    cfg = _cfg(followed, "follow=true", "total_steps_per_game=64", "eval_every=32", "checkpoint_every=64")
    games, paths = resolve_games(cfg)
    spec, size = sized_network(cfg.size, games, cfg.width, cfg.extra_fc)
    learner = Driven(spec, cfg, games, [load_agent(followed).net], torch.device("cpu"), size.counts("student"), {})
    learner.teacher_paths = paths
    learner.follow_teachers()
    assert learner.teacher_reloads == 1 and learner.teacher_env_steps == [1000]
    learner.follow_teachers()
    assert learner.teacher_reloads == 1  # unchanged file: not read again
    other = load_agent(make_teacher(tmp_path / "other.pt", GAME, seed=9)).net
    save_agent(followed, other, "teacher", {"source": "training", "env_steps": 5000,
                                            "eval": {"mean": 7.5}})  # the teacher improved
    learner.follow_teachers()
    assert learner.teacher_reloads == 2 and learner.teacher_env_steps == [5000]
    assert learner.teacher_scores == {GAME: 7.5}  # % of teacher is of the one followed now
    assert all(torch.equal(a, b) for a, b in zip(learner.teachers[0].state_dict().values(), other.state_dict().values()))
    assert learner.curve_extra() == {"teacher_env_steps": {GAME: 5000}, "teacher_run_steps": {GAME: 0}}  # no metrics


def test_a_paced_student_waits_for_its_teacher_run_and_not_for_a_finished_or_stalled_one(tmp_path, teacher, monkeypatch):
    from multitask.training import following

    run = tmp_path / "teacher"
    run.mkdir()
    followed = run / "best.pt"
    save_agent(followed, load_agent(teacher).net, "teacher", {"source": "training", "env_steps": 1000})
    cfg = _cfg(followed, "follow=true", "follow_pace=2")
    learner = type("L", (), {"cfg": cfg, "teacher_paths": [followed], "env_steps": 4000})()
    assert following.teacher_run_progress(run) == (0, None)
    (run / "config.toml").write_text("total_steps = 10000\n")
    (run / "metrics.jsonl").write_text('{"env_steps": 1000, "x": 1}\n{"env_steps": 2000}\n{"env_st')  # torn last line
    assert following.teacher_run_progress(run) == (2000, 10000)
    following.keep_pace(learner)  # 4,000 labels at 2 per teacher step: the teacher's 2,000 suffice

    polls = []
    def teacher_steps(_):  # the teacher logs 1,000 more steps per poll
        polls.append(1)
        (run / "metrics.jsonl").write_text(f'{{"env_steps": {2000 + 1000 * len(polls)}}}\n')
    monkeypatch.setattr(following.time, "sleep", teacher_steps)
    learner.env_steps = 9000  # needs 4,500 teacher steps: three polls
    following.keep_pace(learner)
    assert len(polls) == 3

    (run / "metrics.jsonl").write_text('{"env_steps": 10000}\n')  # finished: never waited for again
    learner.env_steps = 10**6
    following.keep_pace(learner)
    (run / "metrics.jsonl").write_text('{"env_steps": 3000}\n')  # stalled below what is needed
    monkeypatch.setattr(following, "FOLLOW_WAIT_SECONDS", 0)
    monkeypatch.setattr(following.time, "sleep", lambda _: None)
    with pytest.raises(UserError, match="logged no progress for 0 minutes \\(at 3,000 env steps\\); start it again"):
        following.keep_pace(learner)
    with pytest.raises(UserError, match="follow_pace is a ratio"):
        _cfg(followed, "follow_pace=-1")


@pytest.mark.slow
def test_online_distillation_end_to_end(tmp_path, run_cli):
    """A teacher run publishes its best so far; a student follows it; the report puts both on one axis."""
    code, _, err = run_cli("teacher", "train", GAME, "total_steps=3000", "learning_starts=500", "eval_every=1000",
                           "eval_episodes=2", "final_eval_episodes=2", "replay_capacity=3000", "num_threads=1",
                           "--out", tmp_path / "T.pt", "--run-dir", tmp_path / "teacher", "--wandb", "off",
                           "--no-progress")
    assert code == 0, err
    best = tmp_path / "teacher" / "best.pt"
    assert load_agent(best).card["env_steps"] in (1000, 2000, 3000)
    cfg = _cfg(best, "follow=true", "total_steps_per_game=128", "eval_every=64", "checkpoint_every=128")
    summary = train_driven(cfg, tmp_path / "student", wandb_mode="off", show_progress=False)
    assert [h["teacher_env_steps"][GAME] for h in summary["history"]] == [load_agent(best).card["env_steps"]] * 2
    assert [h["teacher_run_steps"][GAME] for h in summary["history"]] == [3000] * 2  # the finished teacher run
    code, out, err = run_cli("report", "online", tmp_path / "student", tmp_path / "teacher", "--out", tmp_path / "r")
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "online-minatar-Breakout.json").read_text())
    assert report["teacher"]["env_steps"] == [1000, 2000, 3000] and len(report["student"]["scores"]) == 2
    assert report["student"]["env_steps"] == [3000, 3000]  # placed at the teacher's training, not its snapshot
    assert (tmp_path / "r" / "online-minatar-Breakout.png").read_bytes()[:4] == b"\x89PNG"


def test_online_curve_without_recorded_teacher_progress_needs_pace_one(tmp_path):
    from multitask.evaluation.online import student_curve

    history = [{"env_steps": 50_000, "teacher_env_steps": {GAME: 100_000}, "scores": {GAME: 3.0}},
               {"env_steps": 100_000, "teacher_env_steps": {GAME: 100_000}, "scores": {GAME: 4.0}}]
    (tmp_path / "summary.json").write_text(json.dumps({"config": {"follow": True, "follow_pace": 1.0},
                                                       "history": history}))
    curve = student_curve(tmp_path, GAME)
    assert curve["env_steps"] == [50_000, 100_000] and curve["x_axis"].startswith("student's labels")
    (tmp_path / "summary.json").write_text(json.dumps({"config": {"follow": True, "follow_pace": 0.0},
                                                       "history": history}))
    with pytest.raises(UserError, match="recorded no teacher progress and did not keep pace 1"):
        student_curve(tmp_path, GAME)


def _learner(teacher: Path, *extra: str) -> Driven:
    cfg = _cfg(teacher, "device=cpu", *extra)
    games, paths = resolve_games(cfg)
    spec, size = sized_network(cfg.size, games, cfg.width, cfg.extra_fc)
    teachers = [load_agent(p).net.eval() for p in paths]
    learner = Driven(spec, cfg, games, teachers, torch.device("cpu"), size.counts("student"), {GAME: None})
    learner.begin_episodes()
    return learner


def _recording_steps(learner: Driven) -> list:
    """Every env step's result, as the envs returned it."""
    envs, steps = learner.envs[0], []
    play = envs.step
    envs.step = lambda actions: steps.append(play(actions)) or steps[-1]
    return steps


def test_a_rollout_records_what_was_played_and_the_teachers_labels(teacher):
    """The rollout's rows against the envs and the teacher: V_pi(s) = sum_a softmax(q / tau)(a) q(s, a)
    of each observation, alive_next the envs' own not-done, the game rewards, and the actions the
    student's policy took (a head biased to action 2 takes only action 2)."""
    learner = _learner(teacher, "variant=teacher_v_reward", "tau=0.5", "baseline_rate=0.5")
    with torch.no_grad():
        learner.net.heads[0].bias.copy_(torch.tensor([0.0, 0.0, 50.0]))
    steps = _recording_steps(learner)
    rollout = learner._play(0)
    q = learner.teachers[0](rollout["obs"].flatten(0, 1)).double().view(*rollout["obs"].shape[:2], -1)
    assert torch.allclose(rollout["teacher_value"], (torch.softmax(q / 0.5, -1) * q).sum(-1))
    assert torch.equal(rollout["alive_next"], torch.stack([torch.from_numpy(~s.done) for s in steps]))
    assert torch.equal(rollout["rewards"], torch.stack([torch.from_numpy(s.reward).double() for s in steps]))
    assert (rollout["actions"] == 2).all() and float(rollout["teacher_share"]) == 0.0
    # the teacher V reward's bootstrap: V_pi of what the envs show after the rollout
    q_next = learner.teachers[0](torch.from_numpy(learner.envs[0].obs)).double()
    assert torch.allclose(rollout["next_value"], (torch.softmax(q_next / 0.5, -1) * q_next).sum(-1))
    learner.learn()  # the baseline moves half way from 0 towards the rollout's mean pseudo-return
    assert learner.last[0]["pseudo_return"] != 0.0
    assert learner.baselines[0] == pytest.approx(0.5 * learner.last[0]["pseudo_return"])


def test_game_rewards_are_clipped_as_the_suites_teachers_learnt_them(tmp_path, teacher):
    learner = _learner(teacher, "variant=on_policy_distill+R", "reward_clip=true")
    steps = _recording_steps(learner)
    envs, play = learner.envs[0], learner.envs[0].step

    def bigger(actions):  # MinAtar pays 0 or 1: scale it to see the clip
        step = play(actions)
        return step._replace(reward=step.reward * 5.0 - 3.0)
    envs.step = bigger
    rollout = learner._play(0)
    raw = torch.stack([torch.from_numpy(s.reward).double() * 5.0 - 3.0 for s in steps])
    assert torch.equal(rollout["rewards"], raw.clamp(-1.0, 1.0)) and (raw.abs() > 1).any()
    summary = train_driven(_cfg(teacher, "total_steps_per_game=32", "eval_every=32", "checkpoint_every=32"),
                           tmp_path / "run", wandb_mode="off", show_progress=False)
    assert summary["config"]["reward_clip"] is False  # MinAtar's teachers learnt raw rewards


def test_a_full_teacher_share_plays_the_teachers_actions(teacher):
    learner = _learner(teacher, "variant=on_policy_distill", "teacher_share=1.0", "tau=0")
    observed = []
    play = learner._play
    learner._play = lambda g: observed.append(play(g)) or observed[-1]
    learner.learn()
    rollout = observed[0]
    q = learner.teachers[0](rollout["obs"].flatten(0, 1)).view(*rollout["obs"].shape[:2], -1)
    assert torch.equal(rollout["actions"], q.argmax(-1)) and float(rollout["teacher_share"]) == 1.0


def test_a_policy_gradient_variant_decaying_from_a_full_teacher_share_trains(teacher):
    """At teacher_share 1 (the first rollout of a decay from 1) the teacher plays every step, so a variant
    with no per-step loss has nothing that depends on the weights: that rollout takes no update (it used to
    end the run in a traceback), the next one, partly the student's, does."""
    learner = _learner(teacher, "variant=entropy_regularised", "teacher_share=1", "teacher_share_decay_steps=1000",
                       "updates_per_rollout=2")
    learner.learn()
    assert learner.updates == 0 and learner.env_steps == 4 * 8
    before = [p.detach().clone() for p in learner.net.parameters()]
    learner.learn()
    assert learner.updates == 2 and any(not torch.equal(a, b) for a, b in zip(before, learner.net.parameters()))
