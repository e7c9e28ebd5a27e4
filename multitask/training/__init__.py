"""Trainers: DQN teachers online (`teacher`), students offline from datasets (`student`, `sweep`),
the multi-task DQN baseline online on all games (`baseline`), and what they share: the run folder
(`run`), per-game acting (`acting`), evaluation scoring (`scoring`), torchrun processes
(`distributed`), losses and W&B tracking (`tracking`)."""
