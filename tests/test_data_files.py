"""Small real dataset files written through the writer: the reader's chunk cache, files of 0 steps
(a build killed before its first flush), and the manifest of a folder of datasets."""

import json

import numpy as np
import pytest

from multitask.agents.checkpoints import load_teacher
from multitask.data.build import build_dataset, dataset_attrs
from multitask.data.build_config import DatasetConfig
from multitask.data.reader import DatasetReader
from multitask.data.schema import Compression, Episode, parts_dir
from multitask.data.verify import verify_invariants
from multitask.data.writer import DatasetWriter
from multitask.envs import get_game
from multitask.errors import UserError

GAME = "minatar/Breakout"


@pytest.fixture
def new_writer(tmp_path, make_teacher):
    """new_writer(path, compression=None) -> a DatasetWriter of a new, empty Breakout dataset."""
    game = get_game(GAME)
    teacher, _ = load_teacher(make_teacher(tmp_path / "t.pt", GAME), game)

    def make(path, compression: Compression | None = None) -> DatasetWriter:
        path.parent.mkdir(parents=True, exist_ok=True)
        comp = compression or DatasetConfig().compression_settings()
        return DatasetWriter.create(path, dataset_attrs(game, teacher, 100), comp)
    return make


def _episodes(count: int, length: int = 5, seed: int = 0) -> list[Episode]:
    """Complete episodes of random frames, each ending in game over."""
    game, rng = get_game(GAME), np.random.default_rng(seed)
    end = np.arange(length) == length - 1
    return [Episode(frames=rng.integers(0, 2, (game.stack + length, *game.frame_shape), dtype=np.uint8),
                    teacher_outputs=rng.normal(size=(length, game.num_actions)).astype(np.float32),
                    action=rng.integers(0, game.num_actions, length), reward=np.ones(length, np.float32),
                    terminated=end, truncated=np.zeros(length, bool), life_lost=end, complete=True, policy=0,
                    epsilon=0.05, env_seed=0, env_episode=k) for k in range(count)]


def test_chunk_cache_keeps_the_most_recently_used_chunks_and_reads_exact_frames(tmp_path, new_writer):
    """A cache of two chunks: reading a third evicts the least recently used; values never change."""
    path = tmp_path / "c.h5"
    comp = Compression(frames="gzip", level=1, frame_chunk=4, step_chunk=16)
    writer = new_writer(path, comp)
    writer.finalize({}, _episodes(5))  # 5 x (stack - 1 pads + 6 frames) >= 30 frames: 8 chunks of 4 or more
    with DatasetReader(path) as whole:
        everything = whole.read_frames()
    chunk_bytes = 4 * int(np.prod(get_game(GAME).frame_shape))
    with DatasetReader(path, cache_bytes=2 * chunk_bytes) as d:
        assert d.chunk_rows == 4 and d.num_chunks == -(-d.frame_rows // 4) >= 7
        for rows, cached in [([0], (0,)), ([5], (0, 1)), ([1], (1, 0)), ([9], (0, 2)), ([13, 2, 6], (1, 3))]:  # chunks 0, 1, 3 in turn
            assert np.array_equal(d.frames(np.array(rows)), everything[rows])
            assert d.cached_chunks == cached, rows
        rows = np.array([[26, 0], [13, 13]])  # any shape, repeats: (2, 2, C, H, W)
        assert np.array_equal(d.frames(rows), everything[rows])
        assert np.array_equal(d.gather(rows, d.read_chunks([0, 3, 6])), everything[rows])


@pytest.fixture
def empty_dataset(tmp_path, new_writer):
    """A dataset of 0 steps, as a build killed before its first flush leaves it; and its teacher."""
    path = tmp_path / "empty.h5"
    new_writer(path).close()
    return path, tmp_path / "t.pt"


def test_verify_of_a_file_of_zero_steps_with_its_teacher_says_ok(empty_dataset, run_cli):
    path, teacher = empty_dataset
    code, out, err = run_cli("dataset", "verify", "--teacher", teacher, path)
    assert code == 0 and "Traceback" not in err, err
    assert "ok, 0 steps" in out and "nothing to sample" in out and "build incomplete" in out


def test_info_of_a_file_of_zero_steps_has_no_bytes_per_step(empty_dataset, run_cli):
    path, _ = empty_dataset
    code, out, _ = run_cli("dataset", "info", path, "--json")
    assert code == 0 and json.loads(out)["bytes_per_step"] is None and json.loads(out)["steps"] == 0
    code, out, _ = run_cli("dataset", "info", path)
    assert code == 0 and " - bytes/step" in out


def test_manifest_lists_every_dataset_under_the_folder(tmp_path, new_writer, run_cli, monkeypatch):
    """A complete build, a build in progress (its part files are not datasets), a file of 0 steps and
    a corrupt file: one row each, in datasets/MANIFEST.md by default."""
    folder = tmp_path / "datasets"
    build_dataset(GAME, tmp_path / "t.pt", folder / "minatar" / "Breakout.h5", DatasetConfig(steps=300, num_envs=4),
                  show_progress=False)
    building = new_writer(folder / "minatar" / "Partial.h5")
    building.flush(_episodes(2))
    building.close()
    assert any(parts_dir(folder / "minatar" / "Partial.h5").glob("*.h5"))
    new_writer(folder / "atari" / "Empty.h5").close()
    (folder / "Bad.h5").write_bytes(b"not hdf5" * 10)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("dataset", "manifest")
    assert code == 0 and "datasets/MANIFEST.md" in out, err
    lines = (folder / "MANIFEST.md").read_text().splitlines()
    rows = {r.split("|")[1].strip(" `"): [c.strip() for c in r.split("|")[2:-1]] for r in lines if r.startswith("| `")}
    assert sorted(rows) == ["Bad.h5", "atari/Empty.h5", "minatar/Breakout.h5", "minatar/Partial.h5"]
    game, steps, complete, mean, sha, size, per_step, status = rows["minatar/Breakout.h5"]
    with DatasetReader(folder / "minatar" / "Breakout.h5") as d:
        e = d.episodes
        assert (game, steps, status) == (GAME, "300", "complete")
        assert complete == str(int(e["complete"].sum())) and float(mean) == pytest.approx(
            e["return"][e["complete"]].mean(), abs=0.005)
        assert sha == f"`{d.info.teacher['sha256'][:12]}`" and size.endswith(" MiB") and float(per_step) > 0
    assert rows["minatar/Partial.h5"][1] == "10" and rows["minatar/Partial.h5"][-1].startswith("building")
    assert rows["atari/Empty.h5"][1:3] == ["0", "0"] and rows["atari/Empty.h5"][3] == "-" == rows["atari/Empty.h5"][6]
    assert rows["Bad.h5"][-1].startswith("unreadable")
    code, _, err = run_cli("dataset", "manifest", tmp_path / "nowhere")
    assert code == 2 and "not a folder" in err


def test_kl_targets_say_how_sharp_each_temperature_makes_the_teacher(tmp_path, make_teacher, run_cli):
    from multitask.data.summary import kl_targets

    k = kl_targets(np.array([[1.0, 0.0], [3.0, 3.0]], dtype=np.float32), taus=(1.0, 0.01))
    assert k["top_two_gap_median"] == pytest.approx(0.5)  # gaps 1 and 0
    # shares: 1 / (1 + e^-1) = 0.731 and 1/2 at tau 1 (median 0.616); ~1 and 1/2 at tau 0.01 (median 0.75)
    assert k["top_share_median"] == pytest.approx({"1": (1 / (1 + np.exp(-1)) + 0.5) / 2, "0.01": 0.75})
    assert k["uniform_share"] == 0.5 and k["states"] == 2
    path = tmp_path / "d.h5"
    build_dataset(GAME, make_teacher(tmp_path / "t.pt", GAME), path, DatasetConfig(steps=200, num_envs=4),
                  show_progress=False)
    code, out, _ = run_cli("dataset", "info", path)
    assert code == 0 and "median share of the top action in softmax(q / tau)" in out and "(uniform 0.33)" in out
    with DatasetReader(path) as d:
        q = d.steps["teacher_outputs"]
    code, out, _ = run_cli("dataset", "info", path, "--json")
    assert json.loads(out)["kl_targets"] == json.loads(json.dumps(kl_targets(q)))  # every step: 200 < the sample


def _tagged_episodes(game, lengths, stack: int | None = None) -> list[Episode]:
    """Episodes whose frames are each filled with their own row number in the file (pads included),
    so that a rebuilt observation names the rows it was made of."""
    stack = game.stack if stack is None else stack
    out, row = [], 0
    for k, length in enumerate(lengths):
        n = stack - 1 + length + 1  # pads, s_0 .. s_length
        frames = np.broadcast_to((row + np.arange(n, dtype=np.uint8))[:, None, None, None],
                                 (n, *game.frame_shape)).copy()
        row += n
        end = np.arange(length) == length - 1
        out.append(Episode(frames=frames, teacher_outputs=np.zeros((length, game.num_actions), np.float32),
                           action=np.zeros(length, np.int64), reward=np.ones(length, np.float32), terminated=end,
                           truncated=np.zeros(length, bool), life_lost=end, complete=True, policy=0,
                           epsilon=0.25, env_seed=9, env_episode=k))
    return out


def test_packing_numbers_each_episodes_frames_after_its_stack_minus_one_pads():
    """By hand, stack 4: an episode of length L owns 3 + L + 1 frame rows, s_0's own frame 3 rows
    after its first; rows, steps and episodes numbered after what the writer already holds."""
    from multitask.data.packing import pack_episodes

    game = get_game("atari/Breakout")
    p = pack_episodes(_tagged_episodes(game, [2, 3]), step0=10, episode0=2, frame0=100, stack=4)
    # episode 2: frames 100..105 (pads 100-102, s_0..s_2 103-105); episode 3: frames 106..112
    assert p.episodes["first_frame"].tolist() == [103, 109]
    assert p.steps["frame_index"].tolist() == [103, 104, 109, 110, 111]
    assert p.episodes["first_step"].tolist() == [10, 12] and p.episodes["length"].tolist() == [2, 3]
    assert p.steps["episode"].tolist() == [2, 2, 3, 3, 3] and len(p.frames) == 13
    assert np.allclose(p.episodes["epsilon"], 0.25) and p.episodes["return"].tolist() == [2.0, 3.0]
    one = pack_episodes(_tagged_episodes(game, [2, 3], stack=1), step0=0, episode0=0, frame0=7, stack=1)
    assert one.episodes["first_frame"].tolist() == [7, 10]  # no pads
    assert one.steps["frame_index"].tolist() == [7, 8, 10, 11, 12]


def test_a_file_of_four_frame_stacks_rebuilds_every_observation_oldest_first(tmp_path, make_teacher):
    """A real (tiny) Atari-shaped file, written in a flush and a finalize: every observation is the 4
    frames ending at its own, oldest first, the first one of an episode its pads and s_0; next_obs
    (reader.next_obs, batch and reader[i]) the same one row later."""
    game = get_game("atari/Breakout")
    teacher, _ = load_teacher(make_teacher(tmp_path / "t.pt", game.name), game)
    path = tmp_path / "a.h5"
    writer = DatasetWriter.create(path, dataset_attrs(game, teacher, 100), DatasetConfig().compression_settings())
    episodes = _tagged_episodes(game, [2, 1, 3])
    writer.flush(episodes[:1])
    writer.finalize({}, episodes[1:])
    with DatasetReader(path) as d:
        assert d.stack == 4 and len(d) == 6 and d.frame_rows == 6 + 5 + 7 and verify_invariants(d) == []
        assert d.episodes["first_frame"].tolist() == [3, 9, 14]
        assert d.steps["frame_index"].tolist() == [3, 4, 9, 14, 15, 16]
        rows = [[0, 1, 2, 3], [1, 2, 3, 4], [6, 7, 8, 9], [11, 12, 13, 14], [12, 13, 14, 15], [13, 14, 15, 16]]
        idx = np.arange(len(d))
        assert d.obs(idx)[:, :, 0, 0].tolist() == rows  # channel j = the frame in row rows[t][j]
        following = [[r + 1 for r in stack] for stack in rows]
        assert d.next_obs(idx)[:, :, 0, 0].tolist() == following
        assert d.batch(idx).next_obs[:, :, 0, 0].tolist() == following
        for i in idx:
            assert np.array_equal(d.next_obs([i])[0], d[i].next_obs) and np.array_equal(d.obs([i])[0], d[i].obs)
        assert d.obs(idx).shape == (6, *game.obs_shape)


# ---- damaged files: one sentence (exit 2), never a traceback or a silent wrong answer --------------

def _finished(new_writer, path, comp: Compression | None = None):
    new_writer(path, comp).finalize({}, _episodes(3))
    return path


def _copy(src, dst, edit=None):
    import h5py
    dst.write_bytes(src.read_bytes())
    if edit is not None:
        with h5py.File(dst, "r+") as f:
            edit(f)
    return dst


@pytest.mark.parametrize("attr", ["num_actions", "compression", "teacher_output_kind", "builds", "frame_shape"])
def test_a_file_missing_a_root_attribute_is_refused_in_one_sentence(tmp_path, new_writer, run_cli, attr):
    good = _finished(new_writer, tmp_path / "good.h5")
    bad = _copy(good, tmp_path / "bad.h5", lambda f: f.attrs.__delitem__(attr))
    for cmd in ("verify", "info"):
        code, _, err = run_cli("dataset", cmd, bad)
        assert code == 2 and f"lacks the root attribute {attr}" in err and str(bad) in err, (cmd, err)
    code, _, err = run_cli("dataset", "build", GAME, "--teacher", tmp_path / "t.pt", "--steps", 200, "--out", bad,
                           "--resume", "--no-progress")
    assert code == 2 and f"lacks the root attribute {attr}" in err


def test_a_build_in_progress_without_its_part_files_is_refused_not_read_as_zeros(tmp_path, new_writer, run_cli):
    """HDF5 reads a virtual dataset's missing source as zeros: a master moved without its .parts
    folder, or with a part deleted or truncated, must be refused by name, not summarised as zeros."""
    import shutil
    path = tmp_path / "b" / "P.h5"
    writer = new_writer(path)
    writer.flush(_episodes(2))
    writer.flush(_episodes(2, seed=1))
    writer.close()
    alone = tmp_path / "alone" / "P.h5"
    alone.parent.mkdir()
    shutil.copy(path, alone)
    lost = tmp_path / "lost" / "P.h5"
    shutil.copytree(path.parent, lost.parent)
    (parts_dir(lost) / "part-000001.h5").unlink()
    short = tmp_path / "short" / "P.h5"
    shutil.copytree(path.parent, short.parent)
    part = parts_dir(short) / "part-000000.h5"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    for p, what in [(alone, "missing"), (lost, "missing"), (short, "cannot be read")]:
        for cmd in ("verify", "info"):
            code, _, err = run_cli("dataset", cmd, p)
            assert code == 2 and "part file" in err and what in err and "Traceback" not in err, (p, cmd, err)
        with pytest.raises(UserError, match="part file"):
            DatasetWriter.resume(p)  # before any play, not after it
    code, _, _ = run_cli("dataset", "manifest", tmp_path / "alone")
    assert code == 0 and "unreadable" in (tmp_path / "alone" / "MANIFEST.md").read_text()
    assert run_cli("dataset", "verify", path)[0] == 0  # the intact build in progress still verifies


def test_verify_checks_dtypes_shapes_and_the_game_it_names(tmp_path, new_writer, run_cli):
    good = _finished(new_writer, tmp_path / "good.h5")
    assert run_cli("dataset", "verify", good)[0] == 0

    def int64_actions(f):
        a = f["steps/action"][:]
        del f["steps/action"]
        f["steps/action"] = a.astype(np.int64)

    def nan_epsilon(f):
        f["episodes/epsilon"][0] = np.nan

    cases = [(int64_actions, "/steps/action is int64"),
             (lambda f: f.attrs.__setitem__("game", "Asterix"), "minatar/Asterix has 5 legal actions"),
             (lambda f: f.attrs.__setitem__("frame_shape", "[7, 10, 10]"), "frame_shape [7, 10, 10]"),
             (nan_epsilon, "epsilon outside [0, 1]")]
    for k, (edit, message) in enumerate(cases):
        bad = _copy(good, tmp_path / f"bad{k}.h5", edit)
        code, _, err = run_cli("dataset", "verify", bad)
        assert code == 2 and message in err, (message, err)


def test_verify_checks_which_episodes_are_marked_complete(tmp_path, new_writer, run_cli):
    """`complete` decides which returns `dataset info` averages: a budget-cut episode marked complete
    (or a whole game marked cut) used to verify."""
    good = _finished(new_writer, tmp_path / "good.h5")  # three games of 5 steps, each ended by game over

    def cut_by_budget_but_marked_complete(f):  # episode 1 truncated after 5 steps, far from the cap
        for group, row in (("episodes", 1), ("steps", 9)):
            f[f"{group}/terminated"][row] = False
            f[f"{group}/truncated"][row] = True

    def a_game_over_marked_cut(f):
        f["episodes/complete"][0] = False

    for k, (edit, messages) in enumerate([
            (cut_by_budget_but_marked_complete, ["1 episodes marked complete neither ended the game"]),
            (a_game_over_marked_cut, ["1 episodes marked incomplete ended the game",
                                      "followed by more episodes of its env stream"])]):
        bad = _copy(good, tmp_path / f"bad{k}.h5", edit)
        code, _, err = run_cli("dataset", "verify", bad)
        assert code == 2 and all(m in err for m in messages), (messages, err)
        code, out, _ = run_cli("dataset", "info", bad)  # info and the manifest say so too
        assert code == 0 and f"checks    {messages[0]}" in out
    assert "checks    ok" in run_cli("dataset", "info", good)[1]
    assert run_cli("dataset", "manifest", tmp_path)[0] == 0
    rows = [line for line in (tmp_path / "MANIFEST.md").read_text().splitlines() if "bad0.h5" in line or "good.h5" in line]
    assert len(rows) == 2 and ("fails verification" in rows[0]) != ("fails verification" in rows[1])


def test_undecodable_frames_are_a_user_error_for_every_reader(tmp_path, new_writer, run_cli):
    import h5py
    path = _finished(new_writer, tmp_path / "f.h5", Compression(frames="gzip", level=1, frame_chunk=4, step_chunk=16))
    with h5py.File(path, "r") as f:
        chunk = f["frames"].id.get_chunk_info(1)
    with open(path, "r+b") as fh:  # garbage in the middle of one compressed chunk of frames
        fh.seek(chunk.byte_offset + chunk.size // 4)
        fh.write(b"\xff" * max(1, chunk.size // 2))
    with DatasetReader(path) as d:
        with pytest.raises(UserError, match="cannot be decoded"):
            d.load_frames()
    code, _, err = run_cli("dataset", "verify", path)
    assert code == 2 and "cannot be decoded" in err


def test_resume_refuses_a_file_that_fails_verification(tmp_path, make_teacher, run_cli):
    import h5py
    teacher = make_teacher(tmp_path / "t.pt", GAME)
    path = tmp_path / "r.h5"
    build_dataset(GAME, teacher, path, DatasetConfig(steps=200, num_envs=4), show_progress=False)
    with h5py.File(path, "r+") as f:
        f["steps/teacher_outputs"][5, 0] = np.nan
    before = path.read_bytes()
    code, _, err = run_cli("dataset", "build", GAME, "--teacher", teacher, "--steps", 400, "--out", path, "--resume",
                           "--num-envs", 4, "--no-progress")
    assert code == 2 and "cannot resume" in err and "NaN" in err
    assert path.read_bytes() == before and not parts_dir(path).exists()
