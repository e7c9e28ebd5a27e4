"""Agents: what plays a game and how it learns online.

- `networks`: trunks, per-game heads, `MultiHeadNet` (every teacher, student and multi-task DQN);
- `sizes`: student size presets and parameter counts;
- `checkpoints`: the one agent file format (weights + card), loading and game checks;
- `importers`: CleanRL / Stable-Baselines3 Atari DQNs as teachers;
- `dqn`: TD targets, Huber loss, epsilon-greedy, the DQN learner;
- `replay`: the frame-once DQN replay memory.
"""
