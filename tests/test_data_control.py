"""Dataset builds played by a student or a teacher/student mixture and labelled by the teacher
(DAgger-style aggregation): the control policy recorded per episode, the actions the student's, the
labels the teacher's, and the file verifies."""

import json

import numpy as np
import pytest
import torch

from multitask.agents.checkpoints import load_agent
from multitask.agents.networks import pad_channels
from multitask.data.summary import summarize
from multitask.data.loader import GameSource, played_by
from multitask.data.reader import DatasetReader
from multitask.errors import UserError
from multitask.training.student import StudentConfig, resolve_inputs
from multitask.data.verify import check_teacher_outputs, verify_invariants

GAME = "minatar/Breakout"


@pytest.fixture(scope="module")
def nets(tmp_path_factory, make_teacher):
    root = tmp_path_factory.mktemp("control")
    return root, make_teacher(root / "teacher.pt", GAME, seed=1), make_teacher(root / "student.pt", GAME, seed=7)


def _build(run_cli, out, teacher, *words):
    code, _, err = run_cli("dataset", "build", GAME, "--teacher", teacher, "--out", out, "--lanes", "1",
                           "--num-envs", "8", "--no-progress", *words)
    assert code == 0, err


def test_student_play_is_appended_labelled_by_the_teacher(nets, run_cli):
    root, teacher, student = nets
    out = root / "aggregate.h5"
    _build(run_cli, out, teacher, "--steps", "600")
    _build(run_cli, out, teacher, "--steps", "1500", "--resume", "--control", f"student:{student}", "--epsilon", "0")
    with DatasetReader(out) as r:
        policies = r.info.policies
        assert [p["kind"] for p in policies] == ["teacher", "student"]
        assert policies[1]["student_sha256"] == load_agent(student).sha256
        ep = r.episodes
        first, length, policy = ep["first_step"], ep["length"], ep["policy"]
        assert set(policy[first < 600].tolist()) == {0} and set(policy[first >= 600].tolist()) == {1}
        assert int(length[policy == 1].sum()) == 900 and len(r) == 1500
        # the student chose every action of its episodes (epsilon 0: its greedy action)
        rows = np.concatenate([np.arange(f, f + n) for f, n in zip(first[policy == 1], length[policy == 1])])
        net = load_agent(student).net
        with torch.inference_mode():
            greedy = net(pad_channels(torch.from_numpy(r.obs(rows)), net.spec.trunk.in_channels), 0).argmax(1).numpy()
        assert np.array_equal(r.steps["action"][rows], greedy)
        assert verify_invariants(r) == []
        assert check_teacher_outputs(r, load_agent(teacher), sample=300) == []  # labels are the teacher's
        builds = json.loads(r.info.attrs["builds"])
        assert [b["control"] for b in builds] == ["teacher", f"student:{student}"] and builds[1]["policy"] == 1
        ep_done = ep["complete"]
        returns = [ep["return"][(policy == i) & ep_done] for i in (0, 1)]
    code, out_text, err = run_cli("dataset", "verify", out, "--teacher", teacher)
    assert code == 0, err
    # dataset info gives each control policy's own return mean (the file's mixes them)
    control = summarize(out)["control"]
    assert [c["return_mean"] for c in control] == [pytest.approx(r.mean()) if len(r) else None for r in returns]

    # the offline student can train on the student-played steps alone (StudentConfig.control)
    with DatasetReader(out) as r:
        assert np.array_equal(played_by(r, ("student",)), rows) and len(played_by(r, ("teacher", "student"))) == 1500
        teacher_outputs = r.steps["teacher_outputs"]
    source = GameSource(str(out), budget=1 << 30, control=("student",))
    _, q = source.sample(np.random.default_rng(3), 400)
    assert np.array_equal(q, teacher_outputs[rows[np.random.default_rng(3).integers(0, len(rows), 400)]])
    only_teacher = root / "teacher_only.h5"
    _build(run_cli, only_teacher, teacher, "--steps", "200")
    with pytest.raises(UserError, match="no episodes played by student"):
        resolve_inputs(StudentConfig(games=(GAME,), datasets=(str(only_teacher),), control=("student",)))


def test_a_mixture_build_and_bad_controls(nets, run_cli):
    root, teacher, student = nets
    out = root / "mixture.h5"
    _build(run_cli, out, teacher, "--steps", "400", "--control", f"mixture:{student}:0.25")
    with DatasetReader(out) as r:
        assert r.info.policies == [{**r.info.policies[0], "kind": "mixture", "teacher_share": 0.25}]
        assert set(r.episodes["policy"].tolist()) == {0}
    for control, words in (("student", "use teacher, student:<checkpoint>"), (f"mixture:{student}:2", "p in [0, 1]"),
                           (f"student:{root / 'missing.pt'}", "missing.pt")):
        code, _, err = run_cli("dataset", "build", GAME, "--teacher", teacher, "--out", root / "bad.h5", "--steps",
                               "100", "--control", control, "--no-progress")
        assert code == 2 and words in err and err.count("\n") == 1, err
        assert not (root / "bad.h5").exists()


def test_a_dataset_read_through_windows_trains_on_the_kept_episodes_only(nets, run_cli):
    """Over the memory budget the loader reads windows of chunks; with `control`, a window holding none
    of the kept episodes' chunks fell back to rows outside the window and crashed (KeyError in gather).
    Windows are now drawn among the kept episodes' chunks."""
    root, teacher, student = nets
    out = root / "windowed.h5"
    _build(run_cli, out, teacher, "--steps", "2000")
    _build(run_cli, out, teacher, "--steps", "2100", "--resume", "--control", f"student:{student}")
    with DatasetReader(out) as r:
        rows = played_by(r, ("student",))
        labels = {r.obs([i])[0].tobytes(): r.steps["teacher_outputs"][i] for i in rows}
        chunk_bytes = r.chunk_rows * int(np.prod(r.frame_shape))
        assert r.num_chunks > 20 and len(rows) == 100
    source = GameSource(str(out), budget=2 * chunk_bytes, control=("student",))
    assert not source.in_memory
    rng = np.random.default_rng(0)
    for window in range(20):
        obs, q = source.sample(rng, 32, (window, 0, 0))
        for o, label in zip(obs, q):
            assert np.array_equal(labels[o.tobytes()], label)  # a student-played step, with its own label
