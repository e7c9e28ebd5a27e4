"""What datasets hold, at a glance: one file's summary (`dataset info`) and a folder's manifest table
(`dataset manifest`, written to `<folder>/MANIFEST.md`).

Returns are of complete episodes only: episodes cut by a build's step budget are not whole games.
Both run the array checks of `dataset verify` (not decoding the frames) and say what fails.
A file of 0 steps (a build killed before its first flush) has no bytes per step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from multitask.data.reader import DatasetReader, disk_bytes
from multitask.data.verify import verify_invariants
from multitask.errors import UserError
from multitask.files import atomic_write_text

MANIFEST = "MANIFEST.md"
TARGET_TAUS = (1.0, 0.1, 0.01, 0.001)  # the KL temperatures Rusu et al. 2016 chose from
TARGET_SAMPLE = 50_000  # evenly spaced steps: the medians move by < 0.01 beyond this (MinAtar, measured)
COLUMNS = ("file", "game", "steps", "complete episodes", "mean return", "teacher sha256", "size on disk",
           "bytes/step", "status")


def bytes_per_step_on_disk(size: int, steps: int) -> float | None:
    """Bytes on disk per stored step; None without steps (the file's size is all overhead then)."""
    return size / steps if steps else None


def kl_targets(q: np.ndarray, taus=TARGET_TAUS) -> dict[str, Any]:
    """How sharp the KL targets softmax(q / tau) are on these teacher Q-values (N, A; at most
    TARGET_SAMPLE evenly spaced rows are used): the median over states of the gap between the two
    best Q-values, and for each tau the median over states of the top action's probability
    max_a softmax(q / tau)(a) (1 / A: uniform, 1: the greedy action alone). Tau acts on the
    Q-values' own scale, which differs by game and suite: this says what a tau does."""
    q = q[np.linspace(0, len(q) - 1, min(len(q), TARGET_SAMPLE)).astype(int)].astype(np.float64)
    ordered = np.sort(q, axis=1)
    shares = {}
    for tau in taus:
        z = (q - ordered[:, -1:]) / tau
        shares[f"{tau:g}"] = float(np.median(1.0 / np.exp(z).sum(axis=1)))  # top action: exp(0) / sum
    return {"top_two_gap_median": float(np.median(ordered[:, -1] - ordered[:, -2])), "top_share_median": shares,
            "uniform_share": 1.0 / q.shape[1], "states": len(q)}


def summarize(path: Path) -> dict[str, Any]:
    """One dataset's steps, episodes, returns, teacher, control policies and size (`dataset info --json`)."""
    with DatasetReader(path) as d:
        info, e = d.info, d.episodes
        complete = e["complete"]
        ret = e["return"][complete]
        size = disk_bytes(path)
        outputs = d.steps["teacher_outputs"]
        q_values = info.attrs["teacher_output_kind"] == "q_values" and len(outputs) > 0 and outputs.shape[1] > 1
        return {
            "file": str(path), "game": info.game, "status": info.status,
            "schema_version": int(info.attrs["schema_version"]),
            "steps": info.num_steps, "target_steps": info.target_steps,
            "episodes": info.num_episodes, "complete_episodes": int(complete.sum()),
            # steps of episodes the step budget cut: states late in long games are missing from them
            "cut_steps": int(e["length"][~complete].sum()),
            "return_mean": float(ret.mean()) if len(ret) else None,
            "return_min": float(ret.min()) if len(ret) else None,
            "return_max": float(ret.max()) if len(ret) else None,
            "teacher": {k: info.teacher.get(k) for k in ("path", "sha256", "source", "eval_mean")},
            "teacher_output_kind": info.attrs["teacher_output_kind"],
            "kl_targets": kl_targets(outputs) if q_values else None,
            "control": [_control_summary(p, e, e["policy"] == i) for i, p in enumerate(info.policies)],
            "size_bytes": size, "bytes_per_step": bytes_per_step_on_disk(size, info.num_steps),
            "compression": json.loads(info.attrs["compression"]),
            "problems": verify_invariants(d, decode_frames=False),  # arrays in memory: milliseconds
        }


def _control_summary(policy: dict, episodes: dict[str, np.ndarray], mine: np.ndarray) -> dict[str, Any]:
    """One control policy's episodes, epsilons and mean return over its complete episodes (the
    file's return mean mixes every policy: a student's play beside its teacher's)."""
    done = episodes["return"][mine & episodes["complete"]]
    return {**policy, "episodes": int(mine.sum()),
            "epsilon": sorted(set(np.round(episodes["epsilon"][mine].astype(float), 4).tolist())),
            "return_mean": float(done.mean()) if len(done) else None}


def find_datasets(folder: Path) -> list[Path]:
    """Every `*.h5` under `folder`, recursively, except the part files of builds in progress."""
    return sorted(p for p in Path(folder).rglob("*.h5") if not p.parent.name.endswith(".parts"))


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def manifest_row(path: Path, folder: Path) -> list[str]:
    """One table row: a dataset's summary, or what keeps it from being read."""
    name = f"`{path.relative_to(folder)}`"
    try:
        s = summarize(path)
    except UserError as e:
        return [name, "?", "-", "-", "-", "-", _cell(disk_bytes(path) / 2**20, ".2f") + " MiB", "-",
                f"unreadable: {str(e).split(';')[0]}"]
    status = s["status"] if s["status"] == "complete" else f"{s['status']} (target {s['target_steps']:,} steps)"
    if s["problems"]:
        status += f"; fails verification: {s['problems'][0]}"
    return [name, s["game"], f"{s['steps']:,}", f"{s['complete_episodes']:,}", _cell(s["return_mean"], ".2f"),
            f"`{str(s['teacher']['sha256'])[:12]}`", f"{s['size_bytes'] / 2**20:.2f} MiB",
            _cell(s["bytes_per_step"], ".1f"), status]


def manifest_markdown(folder: Path) -> str:
    """MANIFEST.md of the datasets under `folder`: a header and one table row per dataset."""
    folder = Path(folder)
    rows = [manifest_row(p, folder) for p in find_datasets(folder)]
    lines = [f"# Datasets in {folder}", "",
             f"Made by `multitask dataset manifest {folder}` from the files themselves. Mean return: raw "
             f"whole-game score over complete episodes (episodes cut by a build's step budget are left out). "
             f"Status `building`: a build stopped before its target; `multitask dataset build ... --resume` "
             f"continues it. Schema: docs/datasets.md.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if not rows:
        lines.append("| (no datasets) |" + " |" * (len(COLUMNS) - 1))
    return "\n".join(lines) + "\n"


def write_manifest(folder: Path) -> Path:
    """Write `<folder>/MANIFEST.md` (atomically); returns its path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; build datasets into it with `multitask dataset build` "
                        f"or name the folder that holds them")
    path = folder / MANIFEST
    atomic_write_text(path, manifest_markdown(folder))
    return path
