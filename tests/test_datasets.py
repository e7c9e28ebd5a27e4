"""Teacher datasets on real emulators and real HDF5 files: lossless, exact, crash-safe, checked."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from multitask.agents.checkpoints import load_agent, load_teacher
from multitask.envs import get_game
from multitask.data.background import BackgroundWriter
from multitask.data.build import build_dataset, dataset_attrs
from multitask.data.build_config import DatasetConfig
from multitask.data.reader import DatasetReader
from multitask.data.recorder import _is_last_stretch, _shorten, _TimeLog
from multitask.data.schema import Episode, parts_dir
from multitask.data.verify import check_teacher_outputs, verify_invariants
from multitask.data.writer import DatasetWriter


@pytest.mark.parametrize("game,steps,envs", [("minatar/Breakout", 1500, 4),
                                             pytest.param("atari/Breakout", 1500, 3, marks=pytest.mark.slow)])
def test_rebuilt_observations_are_bit_identical_on_every_step(tmp_path, game, steps, envs, make_teacher):
    """Every stored step, episode starts included, rebuilds exactly what the teacher saw."""
    teacher = make_teacher(tmp_path / "t.pt", game)
    seen = {}

    def observe(obs, env_seed, env_episode, t):
        for i in range(len(obs)):
            seen[(int(env_seed[i]), int(env_episode[i]), int(t[i]))] = obs[i].copy()

    out = tmp_path / "d.h5"
    build_dataset(game, teacher, out, DatasetConfig(steps=steps, epsilon=0.5, num_envs=envs, flush_steps=200),
                  show_progress=False, observe=observe)
    with DatasetReader(out) as d:
        assert len(d) == steps and d.info.status == "complete"
        assert verify_invariants(d) == []
        e = d.episodes
        assert e["complete"].sum() >= 2  # real episode boundaries are exercised
        assert np.allclose(e["epsilon"], 0.5)  # the build's epsilon, not the evaluation protocol's 0.05
        for ep in range(d.info.num_episodes):
            idx = np.arange(e["first_step"][ep], e["first_step"][ep] + e["length"][ep])
            batch = d.batch(idx)
            for t in range(len(idx)):
                expected = seen[(int(e["env_seed"][ep]), int(e["env_episode"][ep]), t)]
                assert np.array_equal(batch.obs[t], expected), (ep, t)
                nxt = seen.get((int(e["env_seed"][ep]), int(e["env_episode"][ep]), t + 1))
                if nxt is not None:  # the final observation is never acted on, so never seen
                    assert np.array_equal(batch.next_obs[t], nxt), (ep, t)
        assert check_teacher_outputs(d, load_agent(teacher)) == []


def test_time_log_cuts_exact_rows_across_blocks_and_reuses_pruned_ones():
    """The recorder's per-step log: any env's rows [start, stop) come back exactly, across block
    boundaries, while pruned blocks are recycled for new rows."""
    rng = np.random.default_rng(0)
    log, rows, kept_from = _TimeLog(), [], 0
    for t in range(5 * _TimeLog.BLOCK_ROWS + 37):
        entry = (rng.normal(size=(3, 2)).astype(np.float32), np.full(3, t), rng.random(3) < 0.5,
                 rng.integers(0, 255, (3, 1, 4, 4), dtype=np.uint8))
        log.append(entry)
        rows.append(entry)
        if t % 97 == 0:
            kept_from = max(kept_from, t - int(rng.integers(0, 300)))
            log.prune(kept_from)
        for start in {kept_from, max(kept_from, t - 300), t}:
            env = int(rng.integers(0, 3))
            for field in range(4):
                expected = np.stack([r[field][env] for r in rows[start:t + 1]])
                assert np.array_equal(log.column(env, start, t + 1, field), expected), (t, start, field)
    assert log.free or log.first_block > 0  # pruning happened and blocks were recycled


def _episode(rng: np.random.Generator, game, env_episode: int) -> Episode:
    n = int(rng.integers(3, 9))
    game_over = np.arange(n) == n - 1
    return Episode(frames=rng.integers(0, 2, (n + 1, *game.frame_shape), dtype=np.uint8),
                   teacher_outputs=rng.normal(size=(n, game.num_actions)).astype(np.float32),
                   action=rng.integers(0, game.num_actions, n), reward=rng.normal(size=n).astype(np.float32),
                   terminated=game_over, truncated=np.zeros(n, dtype=bool), life_lost=game_over, complete=True, policy=0,
                   epsilon=0.05, env_seed=3, env_episode=env_episode)


def test_shortening_an_episode_keeps_its_first_steps_cut_by_the_budget():
    """When every env has just reset at a build's end, the newest completed episode is cut to its
    first `keep` steps: its pads, s_0 .. s_keep, truncated at its last step, not a game over."""
    rng = np.random.default_rng(1)
    game, stack, length, keep = get_game("atari/Breakout"), 4, 6, 2
    end = np.arange(length) == length - 1
    frames = np.arange(stack + length, dtype=np.uint8)[:, None, None, None] * np.ones((1, 1, 2, 2), np.uint8)
    ep = Episode(frames=frames, teacher_outputs=rng.normal(size=(length, game.num_actions)).astype(np.float32),
                 action=rng.integers(0, game.num_actions, length), reward=np.arange(length, dtype=np.float32),
                 terminated=end, truncated=np.zeros(length, bool), life_lost=end | (np.arange(length) == 0),
                 complete=True, policy=2, epsilon=0.3, env_seed=17, env_episode=4)
    cut = _shorten(ep, keep)
    assert cut.length == keep and len(cut.frames) == stack - 1 + keep + 1
    assert np.array_equal(cut.frames, frames[:stack + keep])  # pads, s_0, s_1, s_2 (the successor of the last step)
    assert cut.truncated.tolist() == [False, True] and not cut.terminated.any() and not cut.complete
    assert np.array_equal(cut.teacher_outputs, ep.teacher_outputs[:keep]) and np.array_equal(cut.action, ep.action[:keep])
    assert cut.reward.tolist() == [0.0, 1.0] and cut.life_lost.tolist() == [True, False]
    assert (cut.policy, cut.epsilon, cut.env_seed, cut.env_episode) == (2, 0.3, 17, 4)
    assert not ep.truncated.any() and ep.terminated[-1] and ep.complete  # the original is untouched
    assert _shorten(ep, 1).truncated.tolist() == [True] and len(_shorten(ep, 1).frames) == stack + 1


@pytest.mark.parametrize("background", [False, True])
def test_staged_episodes_reach_the_final_file_without_a_master(tmp_path, background, make_teacher):
    """A build's last stretch is staged: not in the master on disk (a crash loses it, nothing claims
    it), no flush may follow, and finalize writes everything in order."""
    game = get_game("minatar/Breakout")
    teacher, _ = load_teacher(make_teacher(tmp_path / "t.pt", game.name), game)
    out = tmp_path / "s.h5"
    writer = DatasetWriter.create(out, dataset_attrs(game, teacher, 100), DatasetConfig().compression_settings())
    writer = BackgroundWriter.start(writer) if background else writer
    rng = np.random.default_rng(0)
    episodes = [_episode(rng, game, k) for k in range(6)]
    writer.flush(episodes[:2])
    flushed = sum(e.length for e in episodes[:2])
    writer.stage(episodes[2:4])
    writer.stage(episodes[4:5])
    assert writer.num_steps == sum(e.length for e in episodes[:5])
    if background:
        writer._wait()  # the stages have been carried out
    assert writer.durable_steps == flushed
    with DatasetReader(out) as d:
        assert len(d) == flushed and verify_invariants(d) == []
    if not background:  # (the child raises the same from its next operation)
        with pytest.raises(RuntimeError, match="only stage or finalize"):
            writer.flush(episodes[5:])
    writer.finalize({}, episodes[5:])
    assert writer.durable_steps == sum(e.length for e in episodes)
    with DatasetReader(out) as d:
        assert d.info.status == "complete" and verify_invariants(d) == [] and not parts_dir(out).exists()
        assert d.episodes["env_episode"].tolist() == list(range(6))
        want = np.concatenate([e.teacher_outputs for e in episodes])
        assert np.array_equal(d.steps["teacher_outputs"], want)
        assert np.array_equal(d.obs(np.arange(len(d))), np.concatenate([e.frames[:-1] for e in episodes]))


def test_only_a_short_last_stretch_is_staged():
    """Staged episodes are lost in a crash, so staging starts only when less than a flush's steps and
    less than flush_seconds of play (at the rate so far) remain: a slow build keeps flushing."""
    fast = {"flush_steps": 75_000, "flush_seconds": 60.0, "played": 100_000, "elapsed": 2.0}  # 50k steps/s
    assert _is_last_stretch(70_000, **fast)
    assert not _is_last_stretch(80_000, **fast)  # more than a flush to go
    slow = {**fast, "elapsed": 200.0}  # 500 steps/s: 70k steps would take 140 s
    assert not _is_last_stretch(70_000, **slow)
    assert _is_last_stretch(29_000, **slow)  # 58 s to go
    assert not _is_last_stretch(1, **{**fast, "flush_seconds": 0.0})


def test_exact_step_count_cut_episodes_and_metadata(tmp_path, make_teacher):
    teacher = make_teacher(tmp_path / "t.pt", "minatar/Asterix")
    out = tmp_path / "a.h5"
    build_dataset("minatar/Asterix", teacher, out, DatasetConfig(steps=1001, num_envs=7, seed=5), show_progress=False)
    with h5py.File(out) as f:  # plain h5py users see a normal, self-describing file
        assert f.attrs["schema"] == "multitask-teacher-dataset" and f.attrs["schema_version"] == 1
        assert f.attrs["status"] == "complete" and not parts_dir(out).exists()
        assert json.loads(f.attrs["action_meanings"]) == list(get_game("minatar/Asterix").action_meanings)
        assert json.loads(f.attrs["env"])["preprocessing"]["sticky_action_prob"] == 0.1
        teacher_attr = json.loads(f.attrs["teacher"])
        assert len(teacher_attr["sha256"]) == 64 and f.attrs["teacher_output_kind"] == "q_values"
        assert f["steps/teacher_outputs"].shape == (1001, 5) and f["steps/teacher_outputs"].dtype == np.float32
        assert f["frames"].compression == "gzip"
    with DatasetReader(out) as d:
        e = d.episodes
        assert int(e["length"].sum()) == 1001
        assert (~e["complete"]).sum() >= 1 and e["truncated"][~e["complete"]].all()
        assert np.allclose(e["epsilon"], 0.05)
        # raw outputs, not probabilities
        q = d.steps["teacher_outputs"]
        assert not np.allclose(q.sum(axis=1), 1.0)
        single = d[17]
        assert np.array_equal(single.obs, d.obs([17])[0]) and single.action == d.steps["action"][17]


def test_existing_output_is_refused_and_overwrite_replaces_it(tmp_path, run_cli, make_teacher):
    teacher = make_teacher(tmp_path / "t.pt", "minatar/Breakout")
    out = tmp_path / "b.h5"
    args = ["dataset", "build", "minatar/Breakout", "--teacher", teacher, "--steps", 300, "--out", out, "--no-progress"]
    assert run_cli(*args)[0] == 0
    code, _, err = run_cli(*args)
    assert code == 2 and "already exists" in err and "--resume" in err
    code, _, err = run_cli(*args, "--overwrite", "--seed", 3)
    assert code == 0
    code, out_text, _ = run_cli("dataset", "info", out, "--json")
    info = json.loads(out_text)
    assert info["steps"] == 300 and info["bytes_per_step"] > 0 and info["control"][0]["kind"] == "teacher"
    with DatasetReader(out) as d:  # the steps of the episodes the budget cut (the last of each env's)
        e = d.episodes
        assert info["cut_steps"] == int(e["length"][~e["complete"]].sum()) > 0
    code, text, _ = run_cli("dataset", "info", out)
    assert f"{info['episodes'] - info['complete_episodes']} cut by the step budget, holding" in text


def test_resume_continues_to_exactly_n(tmp_path, make_teacher):
    teacher = make_teacher(tmp_path / "t.pt", "minatar/Breakout")
    out = tmp_path / "b.h5"
    first_build = build_dataset("minatar/Breakout", teacher, out, DatasetConfig(steps=400, num_envs=4), show_progress=False)
    assert (first_build.steps, first_build.added_steps) == (400, 400)
    with DatasetReader(out) as d:
        first = d.batch(np.arange(400))
    resumed = build_dataset("minatar/Breakout", teacher, out, DatasetConfig(steps=1000, num_envs=4, lanes=1),
                            resume=True, show_progress=False)  # one lane: the teacher in-process, no overlap
    assert (resumed.steps, resumed.added_steps) == (1000, 600)
    with DatasetReader(out) as d:
        assert len(d) == 1000 and verify_invariants(d) == []
        again = d.batch(np.arange(400))
        assert all(np.array_equal(a, b) for a, b in zip(first[1:], again[1:]))  # old steps untouched
        builds = json.loads(d.info.attrs["builds"])
        assert len(builds) == 2 and builds[1]["env_seeds"][0] != builds[0]["env_seeds"][0]


def test_a_build_is_a_function_of_its_seed(tmp_path, monkeypatch, make_teacher):
    """Two lanes, one played in a helper process: timing never changes what is recorded, and the
    build equals one whose lanes all play in this process."""
    teacher = make_teacher(tmp_path / "t.pt", "minatar/Freeway")
    steps = []
    for name in ("a.h5", "b.h5", "c.h5"):
        with monkeypatch.context() as m:
            if name == "b.h5":
                m.setattr("multitask.data.lanes.shared_counters_supported", lambda: False)
            cfg = DatasetConfig(steps=900, num_envs=6, seed=1 if name != "c.h5" else 2, epsilon=0.3)
            build_dataset("minatar/Freeway", teacher, tmp_path / name, cfg, show_progress=False)
        with DatasetReader(tmp_path / name) as d:
            steps.append({k: d.steps[k][:] for k in ("action", "reward", "teacher_outputs", "frame_index")})
    assert all(np.array_equal(steps[0][k], steps[1][k]) for k in steps[0])
    assert not np.array_equal(steps[0]["action"], steps[2]["action"])


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                for c in (t / "children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
def test_killed_builds_leave_valid_files_and_resume_to_exactly_n(tmp_path, make_teacher):
    """SIGKILL a real build at random instants; each time the file must open with plain h5py,
    verify, and still hold every episode it held before; --resume then finishes at exactly N."""
    teacher = make_teacher(tmp_path / "t.pt", "minatar/SpaceInvaders")
    out = tmp_path / "s.h5"
    n = 40_000
    base = [sys.executable, "-m", "multitask", "dataset", "build", "minatar/SpaceInvaders", "--teacher",
            str(teacher), "--steps", str(n), "--out", str(out), "--num-envs", "8", "--flush-steps", "300",
            "--no-progress"]
    rng = random.Random(1234)
    known: dict[tuple, int] = {}  # (env_seed, env_episode) -> length, of every episode seen so far
    kills = 0
    for _ in range(6):
        cmd = base + (["--resume"] if out.exists() else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(2.0, 6.0))
        if proc.poll() is not None:
            break
        helpers = _children(proc.pid)  # the background writer and the lane's helper
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        deadline = time.time() + 5
        while any(Path(f"/proc/{c}").exists() for c in helpers) and time.time() < deadline:
            time.sleep(0.05)  # children die with their parent (PR_SET_PDEATHSIG)...
        assert not any(Path(f"/proc/{c}").exists() for c in helpers), "a helper outlived the killed build"
        if not out.exists():
            continue  # killed before the (empty) dataset was created: nothing left behind
        with h5py.File(out, "r") as f:
            assert f.attrs["schema"] == "multitask-teacher-dataset"
        with DatasetReader(out) as d:
            assert verify_invariants(d) == [], f"after kill {kills}"
            have = {(int(s), int(k)): int(L) for s, k, L in
                    zip(d.episodes["env_seed"], d.episodes["env_episode"], d.episodes["length"])}
        assert all(have.get(key) == L for key, L in known.items()), "an episode flushed earlier was lost"
        known = have
    assert kills >= 3
    done = subprocess.run(base + ["--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    with DatasetReader(out) as d:
        assert len(d) == n and d.info.status == "complete" and verify_invariants(d) == []
        have = {(int(s), int(k)): int(L) for s, k, L in
                zip(d.episodes["env_seed"], d.episodes["env_episode"], d.episodes["length"])}
        assert all(have.get(key) == L for key, L in known.items())
    assert not parts_dir(out).exists()


def test_teacher_for_another_game_or_action_count_is_refused(tmp_path, run_cli, make_teacher):
    other = make_teacher(tmp_path / "asterix.pt", "minatar/Asterix")
    code, _, err = run_cli("dataset", "build", "minatar/Breakout", "--teacher", other, "--steps", 10,
                           "--out", tmp_path / "x.h5")
    assert code == 2 and "no head for minatar/Breakout" in err and not (tmp_path / "x.h5").exists()
    wrong = make_teacher(tmp_path / "wrong.pt", "minatar/Breakout", actions=6)
    code, _, err = run_cli("dataset", "build", "minatar/Breakout", "--teacher", wrong, "--steps", 10,
                           "--out", tmp_path / "x.h5")
    assert code == 2 and "6 actions" in err and not (tmp_path / "x.h5").exists()


def test_unwritable_output_is_refused(tmp_path, run_cli, make_teacher):
    teacher = make_teacher(tmp_path / "t.pt", "minatar/Breakout")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    code, _, err = run_cli("dataset", "build", "minatar/Breakout", "--teacher", teacher, "--steps", 10,
                           "--out", blocker / "x.h5")
    assert code == 2 and "cannot write" in err


def test_nan_teacher_outputs_leave_nothing_behind(tmp_path, run_cli, make_teacher):
    teacher = make_teacher(tmp_path / "t.pt", "minatar/Breakout", nan=True)
    out = tmp_path / "n.h5"
    code, _, err = run_cli("dataset", "build", "minatar/Breakout", "--teacher", teacher, "--steps", 200,
                           "--out", out, "--no-progress")
    assert code == 2 and "NaN or infinite" in err
    assert not out.exists() and not parts_dir(out).exists()


def test_infinite_teacher_outputs_from_finite_weights_leave_nothing_behind(tmp_path, run_cli, make_teacher,
                                                                           monkeypatch):
    """Checkpoint loads refuse NaN weights, so the writer's own guard is reached only by a teacher
    whose finite weights overflow: its outputs are made infinite here."""
    from multitask.agents.networks import MultiHeadNet

    teacher = make_teacher(tmp_path / "t.pt", "minatar/Breakout")
    forward = MultiHeadNet.forward
    monkeypatch.setattr(MultiHeadNet, "forward", lambda self, *a, **k: forward(self, *a, **k) * float("inf"))
    out = tmp_path / "inf.h5"
    code, _, err = run_cli("dataset", "build", "minatar/Breakout", "--teacher", teacher, "--steps", 200,
                           "--out", out, "--lanes", 1, "--no-progress")
    assert code == 2 and "NaN or infinite" in err
    assert not out.exists() and not parts_dir(out).exists()


def test_corrupt_truncated_foreign_and_other_version_files(tmp_path, run_cli, make_teacher):
    teacher = make_teacher(tmp_path / "t.pt", "minatar/Breakout")
    good = tmp_path / "good.h5"
    build_dataset("minatar/Breakout", teacher, good, DatasetConfig(steps=300, num_envs=4), show_progress=False)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5" * 100)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    old = tmp_path / "old.h5"
    old.write_bytes(good.read_bytes())
    with h5py.File(old, "a") as f:
        f.attrs["schema_version"] = 99
    for path, message in [(truncated, "corrupt"), (garbage, "corrupt"), (foreign, "not a multitask teacher dataset"),
                          (old, "schema version 99"), (tmp_path / "missing.h5", "does not exist")]:
        for cmd in ("info", "verify"):
            code, _, err = run_cli("dataset", cmd, path)
            assert code == 2 and message in err and str(path) in err and "Traceback" not in err, (cmd, path, err)


def test_verify_catches_tampering(tmp_path, run_cli, make_teacher):
    teacher = make_teacher(tmp_path / "t.pt", "minatar/Breakout")
    path = tmp_path / "v.h5"
    build_dataset("minatar/Breakout", teacher, path, DatasetConfig(steps=500, num_envs=4), show_progress=False)
    assert run_cli("dataset", "verify", path, "--teacher", teacher)[0] == 0
    with h5py.File(path, "a") as f:
        f["steps/reward"][3] = 100.0  # returns no longer match
    code, _, err = run_cli("dataset", "verify", path)
    assert code == 2 and "returns differ" in err
    with h5py.File(path, "a") as f:
        f["steps/reward"][3] -= 100.0
        f["steps/teacher_outputs"][10, 1] = np.nan
    code, _, err = run_cli("dataset", "verify", path)
    assert code == 2 and "NaN or infinite teacher outputs" in err
    with h5py.File(path, "a") as f:
        f["steps/teacher_outputs"][10, 1] = 0.0
        f["steps/teacher_outputs"][:200] += 1.0  # labels no longer what the teacher says
    assert run_cli("dataset", "verify", path)[0] == 0  # structure is still fine
    code, _, err = run_cli("dataset", "verify", path, "--teacher", teacher)
    assert code == 2 and "differ from the teacher" in err


@pytest.mark.slow
def test_several_games_build_in_parallel_processes(tmp_path, run_cli, monkeypatch, make_teacher):
    """`--games` with the default teacher and output paths, one process per game."""
    monkeypatch.chdir(tmp_path)
    for game in ("minatar/Breakout", "minatar/Asterix"):
        (tmp_path / "teachers" / "minatar").mkdir(parents=True, exist_ok=True)
        make_teacher(tmp_path / "teachers" / f"{game}.pt", game)
    code, out, err = run_cli("dataset", "build", "--games", "minatar/Breakout", "minatar/Asterix", "--steps", 700,
                             "--num-envs", 4, "--no-progress")
    assert code == 0, err
    for game in ("Breakout", "Asterix"):
        with DatasetReader(tmp_path / "datasets" / "minatar" / f"{game}.h5") as d:
            assert d.game == f"minatar/{game}" and len(d) == 700 and verify_invariants(d) == []
