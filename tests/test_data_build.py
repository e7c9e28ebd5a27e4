"""`dataset build` settings (one typed config: defaults, TOML, key=value, flags; saved in the file) and
several games built in parallel when one of them fails."""

import json

import numpy as np
import pytest
import torch

from multitask.data.build import BuildJob, build_dataset, build_many
from multitask.data.build_config import SUITE_NUM_ENVS, DatasetConfig
from multitask.data.reader import DatasetReader
from multitask.devices import pick_device
from multitask.envs import get_game
from multitask.data.verify import verify_invariants
from multitask.errors import UserError


def test_the_config_actually_used_is_saved_with_the_build(tmp_path, run_cli, make_teacher):
    """Defaults <- --config TOML <- key=value <- flags; the resolved config lands in `builds`."""
    teacher = make_teacher(tmp_path / "t.pt", "minatar/Breakout")
    toml = tmp_path / "d.toml"
    toml.write_text("seed = 4\nepsilon = 0.3\nlevel = 4\n")
    out = tmp_path / "b.h5"
    code, _, err = run_cli("dataset", "build", "minatar/Breakout", "epsilon=0.2", "--config", toml, "--teacher",
                           teacher, "--steps", 200, "--out", out, "--lanes", 1, "--no-progress", "flush_seconds=30")
    assert code == 0, err
    with DatasetReader(out) as d:
        cfg = json.loads(d.info.attrs["builds"])[-1]["config"]
        assert json.loads(d.info.attrs["compression"])["level"] == 4
    want = {**DatasetConfig().__dict__, "steps": 200, "seed": 4, "epsilon": 0.2, "level": 4, "lanes": 1,
            "flush_seconds": 30.0, "num_envs": SUITE_NUM_ENVS["minatar"],  # num_envs 0: the suite's
            "device": pick_device("auto").type,  # auto: the device used
            "inference": "lanes"}  # auto: the server only on a GPU with more than one lane
    assert {k: v for k, v in cfg.items() if k != "flush_steps"} == {k: v for k, v in want.items() if k != "flush_steps"}
    assert cfg["flush_steps"] > 0  # resolved from flush_bytes
    code, _, err = run_cli("dataset", "build", "minatar/Breakout", "--teacher", teacher, "--steps", 200,
                           "--out", tmp_path / "c.h5", "--epsilon", 2)
    assert code == 2 and "epsilon must be in [0, 1]" in err
    code, _, err = run_cli("dataset", "build", "minatar/Breakout", "--teacher", teacher, "--out", tmp_path / "c.h5")
    assert code == 2 and "--steps" in err and not (tmp_path / "c.h5").exists()


def test_where_the_teacher_infers_resolves_per_device_and_lanes(monkeypatch):
    game = get_game("minatar/Breakout")
    assert DatasetConfig(steps=10, device="cpu").resolved(game).inference == "lanes"
    monkeypatch.setattr("multitask.data.build_config.pick_device", lambda name: torch.device("cuda"))
    on_gpu = {(mode, lanes): DatasetConfig(steps=10, inference=mode, lanes=lanes).resolved(game)
              for mode in ("auto", "lanes", "server") for lanes in (1, 4)}
    assert [(c.inference, c.lanes) for c in on_gpu.values()] == [
        ("lanes", 1), ("server", 4),  # auto: a server only where there are lanes to feed
        ("lanes", 1), ("lanes", 1),  # the teacher in the lanes on a GPU: no CUDA after fork, one lane
        ("server", 1), ("server", 4)]


def test_a_build_through_the_inference_server_records_what_the_lanes_record(tmp_path, make_teacher):
    """Same seeds, same lanes: the server's forward passes are the lanes' own, so the files agree."""
    teacher = make_teacher(tmp_path / "t.pt", "minatar/Breakout", seed=2)
    recorded = {}
    for inference in ("lanes", "server"):
        out = tmp_path / f"{inference}.h5"
        build_dataset("minatar/Breakout", teacher, out, DatasetConfig(steps=2500, num_envs=12, lanes=2, device="cpu",
                                                                      inference=inference), show_progress=False)
        with DatasetReader(out) as d:
            assert verify_invariants(d) == []
            assert json.loads(d.info.attrs["builds"])[-1]["config"]["inference"] == inference
            recorded[inference] = {k: d.steps[k].copy() for k in ("teacher_outputs", "action", "reward")}
    for k, v in recorded["lanes"].items():
        assert np.array_equal(v, recorded["server"][k]), k


def test_config_dataset_lists_every_key_with_its_default_and_source(run_cli):
    code, out, _ = run_cli("config", "dataset")
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert code == 0 and set(rows) == set(DatasetConfig.__dataclass_fields__)
    assert "0.05" in rows["epsilon"] and "Rusu et al. 2016" in rows["epsilon"]
    assert "measured" in rows["num_envs"] and "measured" in rows["flush_bytes"]


@pytest.mark.slow
def test_a_failing_game_does_not_stop_the_others(tmp_path, make_teacher):
    """Two games in parallel processes, one given a teacher of another game: the other is built and
    complete, and the error names the failing game."""
    breakout = make_teacher(tmp_path / "breakout.pt", "minatar/Breakout")
    cfg = DatasetConfig(steps=300, num_envs=4)
    jobs = [BuildJob("minatar/Asterix", breakout, tmp_path / "Asterix.h5", cfg, show_progress=False),
            BuildJob("minatar/Breakout", breakout, tmp_path / "Breakout.h5", cfg, show_progress=False)]
    with pytest.raises(UserError, match=r"^minatar/Asterix: .*no head for minatar/Asterix") as failed:
        build_many(jobs, workers=2)
    assert "minatar/Breakout: " not in str(failed.value)  # only the failing game is reported
    assert not (tmp_path / "Asterix.h5").exists()
    with DatasetReader(tmp_path / "Breakout.h5") as d:
        assert len(d) == 300 and d.info.status == "complete" and verify_invariants(d) == []
