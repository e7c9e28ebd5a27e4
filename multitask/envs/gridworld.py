"""Paper B's grid worlds (Czarnecki et al. 2019, appendix 1): batches of small tabular MDPs, their
exact values, and value-iteration teachers.

A batch holds B MDPs of one shape, as tensors: `next_state[b, s, m]` (where move m from state s
leads), `reward[b, s]` (paid on entering s), `terminal[b, s]` (entering s ends the episode). After
every action the episode also ends with probability `end_prob` (paper B: 0.01, "ensuring finite
length"). Move noise: with probability `noise` the move is replaced by one drawn uniformly from
all moves (paper B's T(a, s): eta/4 to each of the four moves). Action a makes move a mod M, so
an action space larger than the moves (the |A| = 4000 study) repeats the moves; `observation[s]`
is the student's table row for state s (states sharing a row are aliased).

Random 20x20 grid worlds (`sample_grids`) follow paper B's procedure: walk the cells from the
upper-left corner, row by row, and make each a wall, a +10 terminal or a -10 terminal with the
probabilities in GridConfig; the centre cell is the start and stays empty. The paper does not give
those probabilities or the noise: GridConfig's defaults say what was chosen and why.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from multitask.config import option

MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))  # up, right, down, left, as (row, column) steps
VALUE_ITERATION_TOLERANCE = 1e-9
VALUE_ITERATION_MAX_SWEEPS = 20_000


@dataclass(frozen=True)
class GridConfig:
    size: int = option(20, "grid side (paper B: 20x20)")
    wall_prob: float = option(0.15, "chance a cell is a wall (paper B: unknown; 15% leaves corridors open)")
    goal_prob: float = option(0.02, "chance a cell is a +10 terminal (paper B: unknown; ~8 goals in 400 cells)")
    pit_prob: float = option(0.02, "chance a cell is a -10 terminal (paper B: unknown; as many pits as goals)")
    goal_reward: float = option(10.0, "reward of a goal cell (paper B: +10)")
    pit_reward: float = option(-10.0, "reward of a pit cell (paper B: -10)")
    noise: float = option(0.1, "chance a move is replaced by a uniformly drawn one (paper B's eta; 0.1 as in "
                                "third-party summaries of its set-up)")
    end_prob: float = option(0.01, "chance per step of jumping to the absorbing end state (paper B: 0.01)")
    num_actions: int = option(4, "actions; action a makes move a mod 4 (paper B's |A| study: 4 to 4000)")

    def __post_init__(self):
        if self.size < 1 or self.num_actions < 1:
            raise ValueError("size and num_actions must be positive")
        if not all(0.0 <= p <= 1.0 for p in (self.wall_prob, self.goal_prob, self.pit_prob, self.noise, self.end_prob)):
            raise ValueError("wall_prob, goal_prob, pit_prob, noise and end_prob are probabilities, in [0, 1]")
        if self.wall_prob + self.goal_prob + self.pit_prob > 1.0:  # one draw per cell picks its kind
            raise ValueError("wall_prob + goal_prob + pit_prob is a cell's chance of not being empty, at most 1")


@dataclass
class TabularMDPs:
    """B MDPs of S states and M moves (see module doc); float64 for exact values."""
    next_state: torch.Tensor  # (B, S, M) long
    reward: torch.Tensor  # (B, S) float64, paid on entering
    terminal: torch.Tensor  # (B, S) bool
    start: int
    noise: float
    end_prob: float
    num_actions: int
    observation: torch.Tensor  # (S,) long: the student's table row of each state
    walls: torch.Tensor | None = None  # (B, S) bool, for drawing grids

    @property
    def batch(self) -> int:
        return self.next_state.shape[0]

    @property
    def num_states(self) -> int:
        return self.next_state.shape[1]

    @property
    def num_moves(self) -> int:
        return self.next_state.shape[2]

    @property
    def num_observations(self) -> int:
        return int(self.observation.max()) + 1

    def move_of(self, actions: torch.Tensor) -> torch.Tensor:
        return actions % self.num_moves

    def repeat(self, k: int) -> TabularMDPs:
        """The batch k times over (row j * B + b is MDP b), to play k episodes of each at once."""
        if k == 1:
            return self
        tile = lambda t: None if t is None else t.repeat((k,) + (1,) * (t.dim() - 1))  # noqa: E731
        return replace(self, next_state=tile(self.next_state), reward=tile(self.reward),
                       terminal=tile(self.terminal), walls=tile(self.walls))


def sample_grids(cfg: GridConfig, count: int, seed: int) -> TabularMDPs:
    """`count` random grid worlds (module doc), reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    n = cfg.size
    cells = n * n
    start = (n // 2) * n + n // 2
    walls = np.zeros((count, cells), bool)
    reward = np.zeros((count, cells))
    terminal = np.zeros((count, cells), bool)
    draws = rng.random((count, cells))
    kind = np.where(draws < cfg.wall_prob, 1, np.where(draws < cfg.wall_prob + cfg.goal_prob, 2,
                    np.where(draws < cfg.wall_prob + cfg.goal_prob + cfg.pit_prob, 3, 0)))
    kind[:, start] = 0
    walls[kind == 1] = True
    terminal[(kind == 2) | (kind == 3)] = True
    reward[kind == 2] = cfg.goal_reward
    reward[kind == 3] = cfg.pit_reward
    rows, cols = np.divmod(np.arange(cells), n)
    next_state = np.empty((count, cells, len(MOVES)), np.int64)
    for m, (dr, dc) in enumerate(MOVES):
        r, c = rows + dr, cols + dc
        inside = (r >= 0) & (r < n) & (c >= 0) & (c < n)
        target = np.where(inside, r.clip(0, n - 1) * n + c.clip(0, n - 1), np.arange(cells))
        blocked = walls[:, target] | ~inside[None, :]  # into a wall or off the grid: stay
        next_state[:, :, m] = np.where(blocked, np.arange(cells)[None, :], target[None, :])
    return TabularMDPs(torch.from_numpy(next_state), torch.from_numpy(reward), torch.from_numpy(terminal), start,
                       cfg.noise, cfg.end_prob, cfg.num_actions, torch.arange(cells), torch.from_numpy(walls))


def cyclic_fork(batch: int, reward: float) -> tuple[TabularMDPs, torch.Tensor]:
    """The aliased counter-example MDP (docs/gridworld.md) and its teacher's Q (batch, 13, 3).

    From the start (state 0) action i leads to middle state M_i (states 1-3), which the student sees
    as one observation; in M_i action a ends the episode, paying `reward` when a = i - 1 (mod 3),
    else 0. The teacher, optimal for a sibling task (Q = 1 for action i in M_i, 0 otherwise;
    indifferent at the start), is wrong in every middle state: what it distils into the shared policy
    pays in the next branch. Deterministic (no move noise, no random end); 13 states: start, three
    middle states, nine terminals."""
    s, m = 13, 3
    next_state = torch.zeros(batch, s, m, dtype=torch.long)
    rewards = torch.zeros(batch, s, dtype=torch.float64)
    terminal = torch.zeros(batch, s, dtype=torch.bool)
    q = torch.zeros(batch, s, m, dtype=torch.float64)
    next_state[:, 0] = torch.arange(1, 4)
    for i in range(3):
        ends = 4 + 3 * i + torch.arange(3)
        next_state[:, 1 + i] = ends
        terminal[:, ends] = True
        rewards[:, ends[(i - 1) % 3]] = reward
        q[:, 1 + i, i] = 1.0
    next_state[:, 4:] = torch.arange(4, s)[:, None]  # terminals: never left (the episode has ended)
    observation = torch.tensor([0, 1, 1, 1] + [2] * 9)
    return TabularMDPs(next_state, rewards, terminal, 0, 0.0, 0.0, m, observation), q


def move_probs(mdps: TabularMDPs, policy: torch.Tensor) -> torch.Tensor:
    """(B, S, M) probability of each move actually made under `policy` (B, S, A), noise included."""
    m = mdps.num_moves
    by_move = torch.zeros(policy.shape[:-1] + (m,), dtype=policy.dtype)
    by_move.scatter_add_(-1, mdps.move_of(torch.arange(policy.shape[-1])).expand_as(policy), policy)
    return (1 - mdps.noise) * by_move + mdps.noise / m


def transition_matrix(mdps: TabularMDPs, policy: torch.Tensor) -> torch.Tensor:
    """(B, S, S) state-to-state probabilities under `policy` (B, S, A), noise included."""
    b, s, _ = mdps.next_state.shape
    out = torch.zeros(b, s, s, dtype=torch.float64)
    return out.scatter_add_(2, mdps.next_state, move_probs(mdps, policy.to(torch.float64)))


def policy_values(mdps: TabularMDPs, policy: torch.Tensor) -> torch.Tensor:
    """Exact V_policy (B, S): expected sum of rewards until a terminal or the end, solving
    V = P r + P diag((1 - terminal) (1 - end_prob)) V. `policy` is (B, S, A) over states
    (expand a student's table with `policy[:, observation]`)."""
    p, system = _continuation(mdps, policy)
    return torch.linalg.solve(system, p @ mdps.reward.unsqueeze(-1)).squeeze(-1)


def _continuation(mdps: TabularMDPs, policy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The transition matrix P under `policy` and I - P diag((1 - terminal) (1 - end_prob)): the
    linear system of values (solved as is) and of visits (transposed)."""
    p = transition_matrix(mdps, policy)
    keep = (~mdps.terminal).to(torch.float64) * (1 - mdps.end_prob)
    return p, torch.eye(mdps.num_states, dtype=torch.float64) - p * keep.unsqueeze(1)


def visits(mdps: TabularMDPs, policy: torch.Tensor) -> torch.Tensor:
    """Expected visits (B, S) of each state from the start until the episode ends (terminals are
    entered, not visited: no action is taken there), solving v = e_start + v P diag((1 - terminal)
    (1 - end_prob)); differentiable in `policy` (B, S, A)."""
    _, system = _continuation(mdps, policy)
    start = torch.zeros(mdps.batch, mdps.num_states, 1, dtype=torch.float64)
    start[:, mdps.start] = 1.0
    return torch.linalg.solve(system.transpose(1, 2), start).squeeze(-1)


def optimal_q(mdps: TabularMDPs) -> torch.Tensor:
    """Q* (B, S, A) by value iteration, sweeping until the largest change is below 1e-9: the fixed
    point tabular Q-learning (paper B's teachers) converges to, without its sampling noise."""
    keep = (~mdps.terminal).to(torch.float64) * (1 - mdps.end_prob)
    v = torch.zeros(mdps.batch, mdps.num_states, dtype=torch.float64)
    m = mdps.num_moves
    for _ in range(VALUE_ITERATION_MAX_SWEEPS):
        w = mdps.reward + keep * v  # value of entering each state
        by_move = torch.gather(w.unsqueeze(-1).expand(-1, -1, m), 1, mdps.next_state)  # (B, S, M)
        q = (1 - mdps.noise) * by_move + mdps.noise * by_move.mean(-1, keepdim=True)
        new_v = q.max(-1).values
        if (new_v - v).abs().max() < VALUE_ITERATION_TOLERANCE:
            v = new_v
            break
        v = new_v
    return q[..., mdps.move_of(torch.arange(mdps.num_actions))]
