"""Side-by-side timing for the benchmarks' variants (--layouts): each variant measured in turn with
its baseline, round after round, and reported as the median of the per-round ratios with their range.
This machine's speed drifts by up to 50% within a minute (docs/performance.md), so single
back-to-back windows mislead; a ratio within one round compares like with like."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ROUNDS = 3


def interleaved_ratios(measures: dict[str, Callable[[], float]], base: str,
                       rounds: int = ROUNDS) -> tuple[list[float], dict[str, list[float]]]:
    """Calls every measure (a rate: higher is faster) once per round, in order, `rounds` times.
    Returns the base's rates, one per round, and for every other measure its per-round rate / the
    base's rate in the same round."""
    rates: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            rates[name].append(measure())
    return rates[base], {name: [r / b for r, b in zip(rs, rates[base])] for name, rs in rates.items() if name != base}


def describe(ratios: list[float], base: str) -> str:
    """'ratio 1.13 of fp32 (median of 3 interleaved rounds, 1.11-1.24)'"""
    return (f"ratio {np.median(ratios):.2f} of {base} (median of {len(ratios)} interleaved rounds, "
            f"{min(ratios):.2f}-{max(ratios):.2f})")
