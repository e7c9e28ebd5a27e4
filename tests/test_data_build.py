"""`dataset build` settings (one typed config: defaults, TOML, key=value, flags; saved in the file) and
several games built in parallel when one of them fails."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from multitask.data.build import BuildJob, build_dataset, build_many
from multitask.data.build_config import SUITE_NUM_ENVS, DatasetConfig
from multitask.data.reader import DatasetReader
from multitask.data.schema import parts_dir
from multitask.devices import pick_device
from multitask.envs import get_game
from multitask.data.verify import verify_invariants
from multitask.errors import UserError
from multitask.files import file_sha256


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


@pytest.mark.slow
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


# ---- resume targets, files that are not datasets (the committed MinAtar teacher, tiny real builds) ----

TEACHER = Path(__file__).resolve().parents[1] / "teachers" / "minatar" / "Breakout.pt"


class _Interrupted(Exception):
    pass


def _interrupt(*_):
    raise _Interrupted  # before the first step is played, so before anything reaches the disk


def _info(run_cli, path):
    code, text, err = run_cli("dataset", "info", path, "--json")
    assert code == 0, err
    lines = text.splitlines()  # after what builds called here in-process printed
    return json.loads("\n".join(lines[lines.index("{"):]))


def test_a_resume_to_fewer_steps_leaves_a_complete_file_untouched(tmp_path, run_cli):
    out = tmp_path / "b.h5"
    args = ["dataset", "build", "minatar/Breakout", "--teacher", TEACHER, "--out", out, "--num-envs", 4, "--lanes", 1,
            "--no-progress"]
    assert run_cli(*args, "--steps", 600)[0] == 0
    before = file_sha256(out)
    code, text, err = run_cli(*args, "--steps", 250, "--resume")
    assert code == 0 and "already holds 600 steps" in text and "nothing to add" in text, err
    info = _info(run_cli, out)
    assert (info["steps"], info["target_steps"], info["status"]) == (600, 600, "complete")
    assert file_sha256(out) == before and not parts_dir(out).exists()  # not even rewritten


def _built_then_interrupted(out, steps: int, resume_to: int) -> DatasetConfig:
    """A complete build of `steps`, then a resume to `resume_to` stopped before its first step."""
    cfg = DatasetConfig(steps=steps, num_envs=4, lanes=1)
    build_dataset("minatar/Breakout", TEACHER, out, cfg, show_progress=False)
    with pytest.raises(_Interrupted):
        build_dataset("minatar/Breakout", TEACHER, out, dataclasses.replace(cfg, steps=resume_to), resume=True,
                      show_progress=False, observe=_interrupt)
    return cfg


def test_an_interrupted_resume_has_recorded_its_new_target(tmp_path, run_cli):
    """A resume that raises the target writes it to disk before playing: stopped before its first
    flush, the file says how far it has to go; a later resume to fewer steps than it holds ends it
    there, complete at what it holds."""
    out = tmp_path / "b.h5"
    cfg = _built_then_interrupted(out, 300, 800)
    info = _info(run_cli, out)
    assert (info["steps"], info["target_steps"], info["status"]) == (300, 800, "building")
    code, text, err = run_cli("dataset", "verify", out)
    assert code == 0 and "300 of 800 steps; continue with --resume" in text, err
    done = build_dataset("minatar/Breakout", TEACHER, out, dataclasses.replace(cfg, steps=200), resume=True,
                         show_progress=False)
    assert (done.steps, done.added_steps) == (300, 0)
    info = _info(run_cli, out)
    assert (info["steps"], info["target_steps"], info["status"]) == (300, 300, "complete")
    assert not parts_dir(out).exists()
    with DatasetReader(out) as d:
        assert d.info.attrs["layout"] == "single" and verify_invariants(d) == []


def test_verify_tells_a_checkpoint_from_a_damaged_dataset(tmp_path, run_cli):
    legacy = tmp_path / "legacy.pt"  # torch's pre-zip format: a pickle
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    for path in (TEACHER, legacy):
        for cmd in ("verify", "info"):
            code, _, err = run_cli("dataset", cmd, path)
            assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            assert f"{path} is not a dataset" in err and "looks like a PyTorch checkpoint" in err, err
            assert "delete" not in err, err
    damaged = tmp_path / "damaged.h5"
    build_dataset("minatar/Breakout", TEACHER, damaged, DatasetConfig(steps=200, num_envs=4, lanes=1),
                  show_progress=False)
    damaged.write_bytes(damaged.read_bytes()[:2000])  # the HDF5 signature survives, the rest does not
    code, _, err = run_cli("dataset", "verify", damaged)
    assert code == 2 and "corrupt" in err and "delete it and rebuild" in err and "Traceback" not in err, err


def test_overwrite_replaces_only_a_dataset(tmp_path, run_cli):
    copy = tmp_path / "copy_of_teacher.pt"
    shutil.copyfile(TEACHER, copy)
    notes = tmp_path / "notes.h5"
    notes.write_text("not a dataset\n")
    for path, says in ((copy, "looks like a PyTorch checkpoint"), (notes, "not an HDF5 file")):
        before = path.read_bytes()
        for flags in (["--overwrite"], []):
            code, _, err = run_cli("dataset", "build", "minatar/Breakout", "--steps", 200, "--out", path,
                                   "--teacher", TEACHER, "--num-envs", 4, "--no-progress", *flags)
            assert code == 2 and says in err and "--overwrite" in err and "Traceback" not in err, err
            assert len(err.strip().splitlines()) == 1, err
            assert path.read_bytes() == before and not parts_dir(path).exists()
    # a dataset, a damaged one or a build in progress is replaced
    out = tmp_path / "b.h5"
    _built_then_interrupted(out, 200, 500)
    assert parts_dir(out).exists()
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(out.read_bytes()[:1000])
    for path in (out, damaged):
        code, _, err = run_cli("dataset", "build", "minatar/Breakout", "--steps", 300, "--out", path, "--teacher",
                               TEACHER, "--num-envs", 4, "--lanes", 1, "--no-progress", "--overwrite")
        assert code == 0, err
        info = _info(run_cli, path)
        assert (info["steps"], info["target_steps"], info["status"]) == (300, 300, "complete")
        assert not parts_dir(path).exists()
