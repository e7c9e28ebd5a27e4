"""Who plays a dataset build: the control policy, as `dataset build --control` names it.

- `teacher` (the default): epsilon-greedy on the teacher's outputs (paper A's data);
- `student:<checkpoint>`: epsilon-greedy on a student's outputs for this game, every state still
  labelled by the teacher: DAgger-style aggregation of student-driven data (Ross et al. 2011; paper
  B's student-driven control);
- `mixture:<checkpoint>:<p>`: each step, each env takes the teacher's action with probability p,
  else the student's.

Each control policy a file was built with is an entry of its `policies` attribute; every episode
records the index of the one that played it. Labels always come from the file's one teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from multitask.agents.checkpoints import Agent, check_agent_game, load_agent
from multitask.agents.dqn import epsilon_greedy
from multitask.agents.networks import pad_channels
from multitask.envs import GameSpec
from multitask.errors import UserError

KINDS = ("teacher", "student", "mixture")

# act(teacher outputs, observations) -> actions, in the process that plays the lane
Act = Callable[[np.ndarray, np.ndarray], np.ndarray]


def check_spec(spec: str) -> None:
    """A ValueError unless `spec` has one of the forms above (the checkpoint is checked at build time)."""
    kind, _, rest = spec.partition(":")
    if kind not in KINDS or (kind == "teacher") != (rest == ""):
        raise ValueError(f"control {spec!r}: use teacher, student:<checkpoint> or mixture:<checkpoint>:<p>")
    if kind == "mixture":
        path, _, share = rest.rpartition(":")
        try:
            ok = bool(path) and 0.0 <= float(share) <= 1.0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"control {spec!r}: a mixture is mixture:<checkpoint>:<p> with p in [0, 1]")


@dataclass
class Control:
    kind: str
    student: Agent | None = None
    teacher_share: float = 1.0

    def entry(self, teacher_sha256: str) -> dict[str, Any]:
        """This control policy's entry in a dataset's `policies` attribute."""
        if self.kind == "teacher":
            return teacher_entry(teacher_sha256)
        entry = {"kind": self.kind, "student_path": str(self.student.path), "student_sha256": self.student.sha256,
                 "action_selection": "epsilon-greedy on student outputs"}
        if self.kind == "mixture":
            entry.update(teacher_share=self.teacher_share,
                         action_selection="per step and env: the teacher's epsilon-greedy action with probability "
                                          "teacher_share, else the student's")
        return entry


def resolve(spec: str, game: GameSpec) -> Control:
    """The control policy `spec` names, its student loaded and checked against `game`."""
    check_spec(spec)
    kind, _, rest = spec.partition(":")
    if kind == "teacher":
        return Control("teacher")
    path, share = (rest, 0.0) if kind == "student" else (rest.rpartition(":")[0], float(rest.rpartition(":")[2]))
    student = load_agent(path)
    if game.name not in student.net.games:
        raise UserError(f"control student {path} has no head for {game.name} (it plays {', '.join(student.net.games)})")
    check_agent_game(student, game)
    return Control(kind, student, share)


def teacher_entry(teacher_sha256: str) -> dict[str, Any]:
    return {"kind": "teacher", "sha256": teacher_sha256, "action_selection": "epsilon-greedy on teacher outputs"}


def policy_index(policies: list[dict], control: Control, teacher_sha256: str) -> tuple[list[dict], int]:
    """`policies` with this build's entry (appended unless an equal one is there) and its index."""
    entry = control.entry(teacher_sha256)
    for i, p in enumerate(policies):
        if p == entry:
            return policies, i
    return [*policies, entry], len(policies)


def make_act(control: Control, game: GameSpec, epsilon: float, rng: np.random.Generator) -> Act:
    """The lane's act: epsilon-greedy on the teacher's outputs, on the student's, or a mixture."""
    if control.kind == "teacher":
        return lambda outputs, obs: epsilon_greedy(outputs, epsilon, rng)
    net = control.student.net.eval()
    head, channels = net.head_index(game.name), net.spec.trunk.in_channels

    def act(outputs: np.ndarray, obs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            student = net(pad_channels(torch.from_numpy(obs), channels), head).numpy()
        actions = epsilon_greedy(student, epsilon, rng)
        if control.kind == "mixture":
            use_teacher = rng.random(len(actions)) < control.teacher_share
            actions = np.where(use_teacher, epsilon_greedy(outputs, epsilon, rng), actions)
        return actions
    return act
