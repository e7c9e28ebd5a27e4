"""`multitask pipeline <config.toml>`: every stage, in order, from teachers to the comparison report.

Each stage is the documented command (`dataset build`, `student train`, `baseline train`,
`compare`) run in its own process with its output in runs/pipeline/<name>/<stage>.log, so that a
stage's console is the command's own and a failure points at one log. A stage whose outputs are
complete and were made with the same config is reused, not run again: a dataset that already holds
its steps (`dataset build --resume` says so), a run folder whose summary.json holds the config the
stage would train with; anything else resumes (datasets, students and the multi-task DQN all resume
after a kill) and never mixes in outputs of another config (the commands refuse those). The
comparison reuses every evaluation whose checkpoint, seeds and protocol it has cached.

Ctrl-C or SIGTERM stops the stage before the pipeline exits: the stage runs in a session of its own,
gets the signal once, from the pipeline, has STAGE_STOP_SECONDS to stop as its command does on its
own (a dataset build ends its flush in flight), and is killed with its processes if it has not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from multitask import config as configlib
from multitask.config import option
from multitask.envs import get_game
from multitask.errors import UserError
from multitask.jobs import Terminated, sigterm_raises
from multitask.training.run import finished_with
from multitask.training.tracking import WandbMode

STAGE_STOP_SECONDS = 30.0  # an interrupted stage's time to stop by itself before it is killed


@dataclass(frozen=True)
class TrainerStage:
    config: str = option("", "the trainer's TOML config")
    overrides: tuple[str, ...] = option((), "key=value overrides applied after the config (e.g. a step budget)")


@dataclass(frozen=True)
class PipelineConfig:
    name: str = option("", "the pipeline's name: logs in runs/pipeline/<name>/, the report in results/<name>/")
    games: tuple[str, ...] = option((), "the games, one suite")
    dataset_steps: int = option(200_000, "steps per game's dataset (the MinAtar students' default data)")
    dataset_overrides: tuple[str, ...] = option((), "key=value settings for `dataset build` (multitask config dataset)")
    students: tuple[TrainerStage, ...] = option((), "student runs (configs/student/*.toml), each compared")
    baseline: TrainerStage = option(TrainerStage(), "the multi-task DQN (configs/baseline/*.toml); no config: none")
    episodes: int = option(100, "episodes per agent and game in the comparison (the students' final evaluation's)")
    wandb: WandbMode = option("offline", "W&B mode of every stage (offline: no account needed)")

    def __post_init__(self):
        if not self.name or not self.games:
            raise ValueError("a pipeline needs a name and games")
        if not self.students and not self.baseline.config:
            raise ValueError("a pipeline needs at least one student or a baseline to compare")
        if self.dataset_steps < 1 or self.episodes < 2:
            raise ValueError("dataset_steps must be positive and episodes at least 2 (the comparison's intervals)")


@dataclass
class Stage:
    name: str
    command: list[str]
    reused: Callable[[], str | None]  # why the stage's outputs can be reused, or None


def _run_dir(kind: str, trainer_cfg) -> Path:
    return Path("runs") / kind / trainer_cfg.run_name


def _finished_with(run_dir: Path, trainer_cfg) -> str | None:
    """Why a finished run folder can be reused: its summary.json holds this config (training/run.finished_with)."""
    finished, differences = finished_with(run_dir, trainer_cfg)
    return f"{run_dir} is finished with this config" if finished and not differences else None


def stages(cfg: PipelineConfig) -> tuple[list[Stage], list[Path]]:
    """The stages in order, and the run folders the comparison takes."""
    from multitask.training.baseline import load_config as load_baseline
    from multitask.training.student import StudentConfig

    games = [get_game(g) for g in cfg.games]
    cli = [sys.executable, "-m", "multitask"]
    out: list[Stage] = []
    missing = [g.name for g in games if not (Path("teachers") / g.suite / f"{g.game}.pt").is_file()]
    if missing:
        raise UserError(f"stage teachers: no teacher for {', '.join(missing)} in teachers/<suite>/; import or "
                        f"train them first (`multitask teacher import|train`)")
    build = ["dataset", "build", "--games", *cfg.games, "--steps", str(cfg.dataset_steps), "--resume", "--no-progress",
             *cfg.dataset_overrides]
    recording = _recording(build)
    out.append(Stage("datasets", cli + build, lambda: _datasets_complete(games, cfg.dataset_steps, recording)))
    runs: list[Path] = []
    for s in cfg.students:
        student = configlib.load(StudentConfig, Path(s.config), [f"games={','.join(cfg.games)}", *s.overrides])
        run = _run_dir("student", student)
        out.append(Stage(f"student {student.run_name}", cli + ["student", "train", "--config", s.config,
                                                              f"games={','.join(cfg.games)}", *s.overrides,
                                                              "--no-progress", "--wandb", cfg.wandb],
                         lambda run=run, student=student: _finished_with(run, student)))
        runs.append(run)
    if cfg.baseline.config:
        base = load_baseline(Path(cfg.baseline.config), [f"games={','.join(cfg.games)}", *cfg.baseline.overrides])
        run = _run_dir("baseline", base)
        out.append(Stage(f"baseline {base.run_name}", cli + ["baseline", "train", "--config", cfg.baseline.config,
                                                            f"games={','.join(cfg.games)}", *cfg.baseline.overrides,
                                                            "--no-progress", "--wandb", cfg.wandb],
                         lambda run=run, base=base: _finished_with(run, base)))
        runs.append(run)
    report = Path("results") / cfg.name
    out.append(Stage("compare", cli + ["compare", *map(str, runs), "--out", str(report), "--episodes",
                                       str(cfg.episodes), "--no-progress", "--wandb", cfg.wandb],
                     lambda: _report_current(report, runs, cfg.episodes, cfg.games)))
    return out, runs


def _recording(build: list[str]) -> dict:
    """Who plays and how in the datasets the `dataset build` command line `build` records: its
    control policy and epsilon (DatasetConfig), the settings a dataset's meaning depends on."""
    from multitask.cli import build_parser
    from multitask.cli.dataset import build_request

    args, extra = build_parser().parse_known_args(build)
    if [w for w in extra if "=" not in w]:
        raise UserError(f"dataset_overrides: {' '.join(extra)} is not a `dataset build` setting "
                        f"(`multitask dataset build --help`, `multitask config dataset`)")
    args.overrides = [*args.overrides, *extra]
    cfg = build_request(args)[2]
    return {"control": cfg.control, "epsilon": cfg.epsilon}


def _datasets_complete(games, steps: int, recording: dict) -> str | None:
    """Why the datasets can be reused: each is complete, holds `steps` and was labelled by the
    teacher file that is there now. A dataset recorded with another control policy or epsilon
    (`recording`) is refused: resuming it would mix two kinds of play in one file, and reusing it
    would train on play that the config did not ask for."""
    from multitask.data.reader import root_attrs
    from multitask.data.schema import dataset_path
    from multitask.files import file_sha256

    complete = True  # every file is checked for its settings, complete or not
    for g in games:
        path = dataset_path(g)
        if not path.is_file():
            complete = False
            continue
        attrs = root_attrs(path)
        for build in json.loads(attrs["builds"]):
            played = {k: build.get(k) for k in recording}
            if played != recording:
                raise UserError(f"{path} holds play recorded with control {played['control']}, epsilon "
                                f"{played['epsilon']}, not the pipeline's control {recording['control']}, epsilon "
                                f"{recording['epsilon']} (dataset_overrides); move it away, or give the pipeline "
                                f"the settings it was built with")
        teacher = Path("teachers") / g.suite / f"{g.game}.pt"
        if (attrs.get("status") != "complete" or int(attrs["num_steps"]) < steps
                or json.loads(attrs["teacher"])["sha256"] != file_sha256(teacher)):
            complete = False
    return f"every dataset holds {steps:,} steps labelled by its teacher" if complete else None


def _report_current(report: Path, runs: list[Path], episodes: int, games: Sequence[str] = ()) -> str | None:
    """Why the report can be reused: it compared exactly these checkpoints, beside the teachers now
    at teachers/<suite>/<Game>.pt (the compare stage's default), on as many episodes."""
    from multitask.files import file_sha256

    path = report / "report.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    wanted = sorted(file_sha256(r / "best.pt") for r in runs if (r / "best.pt").is_file())
    if data.get("episodes") != episodes or sorted(i["sha256"] for i in data.get("inputs", [])) != wanted:
        return None
    teachers = {g: Path("teachers") / f"{g}.pt" for g in games}
    now = {g: file_sha256(p) for g, p in teachers.items() if p.is_file()}
    if {g: t.get("sha256") for g, t in (data.get("teachers") or {}).items()} != now:
        return None  # a teacher retrained, imported or removed since: its column and every % of teacher changed
    return f"{path} compares these checkpoints"


def run_pipeline(path: Path, overrides: Sequence[str] = (), say: Callable[[str], None] = print) -> Path:
    cfg = configlib.load(PipelineConfig, Path(path), overrides)
    plan, _ = stages(cfg)
    logs = Path("runs") / "pipeline" / cfg.name
    logs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, stage in enumerate(plan, 1):
        why = stage.reused()
        head = f"[{i}/{len(plan)}] {stage.name}"
        if why:
            say(f"{head}: reused ({why})")
            continue
        log = logs / f"{stage.name.replace(' ', '-')}.log"
        say(f"{head}: running (log {log})")
        t0 = time.perf_counter()
        returncode = _run_stage(stage.command, log, say, stage.name)
        if returncode != 0:
            raise UserError(f"stage {stage.name} failed (exit {returncode}); read {log}; the stages before it "
                            f"are kept, and running the pipeline again continues from this stage")
        say(f"{head}: done in {(time.perf_counter() - t0) / 60:.1f} min; {_last_line(log)}")
    report = Path("results") / cfg.name
    say(f"pipeline {cfg.name}: {(time.perf_counter() - start) / 60:.1f} min -> {report}/report.md, plots "
        f"{report}/*.png, W&B run in {report}/wandb ({cfg.wandb})")
    return report


def _run_stage(command: list[str], log: Path, say: Callable[[str], None], name: str = "") -> int:
    """Run a stage's command: every line it prints (run without progress bars: its set-up, periodic
    evaluation scores and summary) goes to `log` and, indented, to the console as it comes. On
    Ctrl-C or SIGTERM the stage is stopped (`_stop_stage`) before the interrupt goes on."""
    with open(log, "w") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        # its own session: the stage gets an interrupt from the pipeline only, exactly once (a terminal's
        # or a process group's Ctrl-C would reach it as well, and a second one cuts its clean-up short);
        # undecodable bytes are replaced, so that the relay never stops reading
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                encoding="utf-8", errors="replace", start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        relay = threading.Thread(target=_relay, args=(proc.stdout, f, say), name="stage output", daemon=True)
        relay.start()
        with sigterm_raises():
            try:
                proc.wait()
                relay.join()  # the output of every process of the stage
            except BaseException as e:
                _stop_stage(proc, relay, isinstance(e, Terminated), name or log.stem, say)
                raise
        proc.stdout.close()
        return proc.returncode


def _relay(stream, log, say: Callable[[str], None]) -> None:
    """Copy the stage's output to its log and the console until every process holding it ended."""
    console = True
    try:
        for line in stream:
            log.write(line)
            log.flush()
            if line.strip() and console:
                try:
                    say("    " + line.rstrip()[:200])
                except Exception:  # noqa: BLE001 - a console gone: the log still gets every line
                    console = False
    except (ValueError, OSError):  # the log or the pipe closed after a stage that was killed
        if not (log.closed or stream.closed):
            raise


def _stop_stage(proc: subprocess.Popen, relay: threading.Thread, terminated: bool, name: str,
                say: Callable[[str], None]) -> None:
    """Have the stage stop within STAGE_STOP_SECONDS, else kill it and its processes. The stage, in a
    session of its own, gets the interrupt once from here: a Ctrl-C goes to its process group, as a
    terminal's would, a SIGTERM to the stage's process. Interrupts that come meanwhile are ignored."""
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        if proc.poll() is None:
            if terminated:
                proc.send_signal(signal.SIGTERM)
            else:
                _kill_group(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + STAGE_STOP_SECONDS
        try:
            proc.wait(timeout=STAGE_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        relay.join(max(0.0, deadline - time.monotonic()))  # its output closes when all its processes ended
        if proc.poll() is None or relay.is_alive():
            # its process group (the stage's session; a pgid is not reused while the group lives), and
            # any descendant that left it, found now and only while the stage runs: no pid reused is killed
            tree = _descendants(proc.pid) if proc.poll() is None else set()
            _kill_group(proc.pid, signal.SIGKILL)
            proc.kill()
            for pid in tree:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            relay.join(5)
            say(f"stage {name}: killed, it had not stopped {STAGE_STOP_SECONDS:g} s after the interrupt; running "
                f"the pipeline again continues from this stage")
        if not relay.is_alive():  # else a process outside the stage's tree holds its output: leave the pipe
            proc.stdout.close()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _descendants(pid: int) -> set[int]:
    """The process's descendants now (Linux; elsewhere none)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            children = [int(c) for t in Path(f"/proc/{p}/task").iterdir() for c in (t / "children").read_text().split()]
        except OSError:
            continue
        todo += [c for c in children if c not in found]
        found.update(children)
    return found


def _kill_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):  # the group has ended
        pass


def _last_line(log: Path) -> str:
    lines = [x for x in log.read_text().splitlines() if x.strip()]
    return lines[-1][:160] if lines else ""
