"""Trainers: DQN teachers online, students offline from datasets, sweeps of students, and the run
scaffolding (run folder, config, resume, metrics, W&B) they share."""
