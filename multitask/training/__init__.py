"""Trainers and what they share.

- `run`: the run folder (config.toml, state.pt, metrics.jsonl, W&B, agent checkpoints), resume and
  its one config check, the clock, schedules (`Every`) and rates: every trainer's scaffolding;
- `distributed`: torchrun processes (rank 0 writes), barriers, gathers, DDP wrapping;
- `scoring`: a network scored on its games, % of teacher, geometric mean, teachers' scores;
- `tracking`: Weights & Biases (the only wandb importer);
- `teacher`: DQN teachers online; `student`: students offline from datasets; `sweep`: grids of
  students; `losses`: the distillation losses (pure).
"""
