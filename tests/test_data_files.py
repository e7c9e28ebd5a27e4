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
from multitask.data.writer import DatasetWriter
from multitask.envs import get_game

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
