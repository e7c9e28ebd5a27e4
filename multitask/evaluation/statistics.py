"""The comparison's statistics: normalised scores, aggregates and their intervals.

Small pure functions. Interval estimates come from rliable (Agarwal et al. 2021, "Deep RL at the
edge of the statistical precipice"), the field's standard for IQM and stratified-bootstrap
confidence intervals, instead of hand-written statistics. Their input is a score matrix of shape
(runs x games); here one agent has one seed, so the runs axis holds its evaluation episodes (the
episodes of a game are independent draws: env i is seeded seed + i and the action noise has its
own stream), and a stratified bootstrap resamples episodes within each game.

rliable's bootstrap draws its indices from numpy's global generator (`np.random.choice`), so
every call here seeds it for the call and restores it after (`_seeded`), making the intervals
reproducible.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np

CI_SIZE = 0.95
BOOTSTRAP_METHOD = "percentile"  # rliable's default: the 2.5th and 97.5th bootstrap percentiles


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def t_multiplier(runs: int) -> float:
    """Half-width of a 95% Student-t interval in standard errors over `runs` runs: t_{0.975, runs-1}
    (1.96 for many episodes, 4.30 for three seeds, 12.7 for two); 0 for one run (no interval)."""
    from scipy import stats  # rliable's own dependency

    return float(stats.t.ppf(0.5 + CI_SIZE / 2, runs - 1)) if runs > 1 else 0.0


def seed_interval(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """Mean over seeds (or other independent units: grid-world MDPs) and its 95% Student-t interval:
    mean -+ t_{0.975, n-1} s / sqrt(n), s the sample standard deviation (n - 1); no interval from
    one. Few seeds give wide intervals, which is the honest answer (3 seeds: t = 4.30)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), None, None
    half = t_multiplier(len(x)) * float(x.std(ddof=1) / np.sqrt(len(x)))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def normalised_score(score: float, low: float | None, high: float | None) -> float | None:
    """(score - low) / (high - low): 0 at `low`, 1 at `high`.

    Teacher-normalised: low = the random policy's score, high = the teacher's; human-normalised
    (Atari): low = random, high = human reference (Mnih et al. 2015). None when a reference is
    missing or high <= low (a teacher no better than random gives no scale to normalise by).
    """
    if low is None or high is None or not high > low:
        return None
    return (score - low) / (high - low)


def normalised_episodes(returns: Sequence[float], low: float | None, high: float | None) -> np.ndarray | None:
    """`normalised_score` of every episode's return (None under the same rule)."""
    if low is None or high is None or not high > low:
        return None
    return (np.asarray(returns, dtype=np.float64) - low) / (high - low)


def score_matrix(columns: dict[str, np.ndarray | None]) -> tuple[np.ndarray | None, list[str]]:
    """rliable's (runs x games) matrix from per-game arrays of per-episode scores, leaving out
    games whose array is None; every game must have the same number of episodes. Returns the matrix
    (None when no game is left) and the games it holds, in column order."""
    games = [g for g, c in columns.items() if c is not None]
    if not games:
        return None, []
    lengths = {len(columns[g]) for g in games}
    if len(lengths) != 1:
        raise ValueError(f"games have different numbers of episodes: {sorted(lengths)}")
    return np.stack([np.asarray(columns[g], dtype=np.float64) for g in games], axis=1), games


def iqm_interval(matrix: np.ndarray, reps: int, seed: int) -> tuple[float, float, float]:
    """Interquartile mean of a (runs x games) matrix and its stratified-bootstrap 95% interval.

    IQM: the mean of the middle 50% of all runs x games scores (25% trimmed from each end;
    rliable.metrics.aggregate_iqm). Interval: rliable.library.get_interval_estimates, which
    resamples runs with replacement within each game (games are the strata, not resampled),
    `reps` times, percentile method. Returns (iqm, low, high).
    """
    from rliable import library, metrics

    with _seeded(seed):
        point, interval = library.get_interval_estimates(
            {"x": matrix}, lambda m: np.array([metrics.aggregate_iqm(m)]), method=BOOTSTRAP_METHOD,
            reps=reps, confidence_interval_size=CI_SIZE)
    return float(point["x"][0]), float(interval["x"][0, 0]), float(interval["x"][1, 0])


def ratio_interval(agent: Sequence[float], teacher: Sequence[float], reps: int, seed: int) -> tuple[float, float] | None:
    """95% interval of one game's % of teacher, 100 * mean(agent) / mean(teacher), by bootstrap.

    The agent's and the teacher's episodes are resampled independently (rliable's
    StratifiedIndependentBootstrap, through get_interval_estimates with a list of two (episodes x 1)
    arrays), `reps` times, percentile method, so the interval holds both evaluations' noise.
    None when the teacher's mean is 0 or below (no % of teacher, see report.pct_of_teacher), and also
    when some resample of the teacher's episodes has a mean of 0 or below (a teacher scoring 0 in
    most episodes): the ratio is then undefined in part of the bootstrap and no interval is given.
    """
    from rliable import library

    a = np.asarray(agent, dtype=np.float64).reshape(-1, 1)
    t = np.asarray(teacher, dtype=np.float64).reshape(-1, 1)
    if not t.mean() > 0:
        return None

    def ratio(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        denominator = y.mean()
        return np.array([100.0 * x.mean() / denominator if denominator > 0 else np.nan])

    with _seeded(seed):
        _, interval = library.get_interval_estimates({"x": [a, t]}, ratio, method=BOOTSTRAP_METHOD,
                                                    reps=reps, confidence_interval_size=CI_SIZE)
    low, high = float(interval["x"][0, 0]), float(interval["x"][1, 0])
    return (low, high) if np.isfinite(low) and np.isfinite(high) else None


def mean_stderr(returns: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample std with ddof=1, over sqrt(n); 0 for one episode)."""
    r = np.asarray(returns, dtype=np.float64)
    return float(r.mean()), float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0
