"""Weights & Biases tracking (the only module that imports wandb).

Offline by default: runs are written under `<run dir>/wandb/offline-run-*` with no account and no
network, and can be uploaded later with `wandb sync <dir>`. `online` needs `wandb login`; `off`
tracks nothing. Metrics are namespaced `<split>/<suite>/<Game>/<metric>` so that W&B groups a
panel per game; `env_steps` (or `updates`) is the x-axis.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from multitask.errors import UserError

WandbMode = Literal["off", "offline", "online"]

_NO_LOGIN = ("W&B online needs `wandb login` or WANDB_API_KEY; use --wandb offline (and `wandb sync "
             "<run dir>/wandb` later) or --wandb off")


def _bad_credentials(e: Exception) -> UserError:
    return UserError(f"W&B online cannot use its credentials ({str(e).splitlines()[0][:120]}); fix them with "
                     f"`wandb login --relogin`, or use --wandb offline or off")


def check_wandb(mode: WandbMode) -> None:
    """Refuse `online` when wandb finds no credentials (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE,
    ~/.netrc or its settings), with one sentence, before a run writes anything: wandb.init would
    otherwise raise its UsageError (or prompt, on a terminal) after the run folder was made. Reads
    local files only, nothing goes over the network. wandb's own credential lookup is internal
    (wandb.sdk.lib.wbauth, wandb 0.31); where it has moved, Tracker's own check is the fallback."""
    if mode != "online":
        return
    try:
        from wandb.errors import AuthenticationError
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
    except ImportError:
        return
    try:
        auth = wbauth.authenticate_session(host=wandb_setup.singleton().settings.base_url,
                                           source="multitask", prompt=False, update_session=False)
    except AuthenticationError as e:
        raise _bad_credentials(e) from None
    except Exception:  # noqa: BLE001 - an internal API that changed: let wandb.init decide
        return
    if auth is None:
        raise UserError(_NO_LOGIN)


class Tracker:
    def __init__(self, mode: WandbMode, run_dir: Path, name: str, config: dict[str, Any],
                 job_type: str, step_metric: str = "env_steps", run_id: str | None = None,
                 group: str | None = None):
        self.mode = mode
        self.run = None
        self.step_metric = step_metric
        if mode == "off":
            return
        import wandb
        from wandb.errors import AuthenticationError, CommError, UsageError

        check_wandb(mode)
        run_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            self.run = wandb.init(
                mode=mode, project=os.environ.get("WANDB_PROJECT", "multitask"), name=name,
                group=group, job_type=job_type, dir=str(run_dir), config=config, id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
        except AuthenticationError as e:
            raise _bad_credentials(e) from None
        except UsageError as e:  # "No API key configured. Use `wandb login` to log in."; others are bugs
            if "api key" not in str(e).lower():
                raise
            raise UserError(_NO_LOGIN) from None
        except CommError as e:
            raise UserError(f"W&B online could not reach its server ({str(e).splitlines()[0][:160]}); "
                            f"use --wandb offline and `wandb sync` the run later") from None
        self.run.define_metric(step_metric)
        self.run.define_metric("*", step_metric=step_metric)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, metrics: dict[str, float], step_value: int) -> None:
        if self.run is not None:
            self.run.log({**metrics, self.step_metric: step_value})

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def table(self, key: str, columns: list[str], rows: list[list[Any]],
              bar: tuple[str, str] | None = None, title: str | None = None) -> None:
        """A `wandb.Table` under `key`; with `bar` (label column, value column) also a bar chart of
        it under `<key>_bar` (`wandb.plot.bar`)."""
        if self.run is None:
            return
        import wandb

        table = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        logged: dict[str, Any] = {key: table}
        if bar is not None:
            logged[f"{key}_bar"] = wandb.plot.bar(table, bar[0], bar[1], title=title or key)
        self.run.log(logged)

    def finish(self) -> None:
        """Finish the run and shut wandb's service down, so that the offline .wandb file is complete
        when this returns: with wandb 0.31, after `run.finish()` alone the file still held only its
        7-byte header in 5 of 12 tries on a busy 2-core machine (written a moment later); after
        `wandb.teardown()` it was complete in 12 of 12 (measured 2026-11-30). One tracker is open
        per process, so the next `wandb.init` simply starts a new service."""
        if self.run is not None:
            import wandb

            self.run.finish()
            self.run = None
            wandb.teardown()
