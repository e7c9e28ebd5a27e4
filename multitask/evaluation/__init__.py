"""Evaluation: the one protocol every agent is scored with, and the tables built from its results."""
