"""multitask: multi-task policy distillation for reinforcement learning.

Implements "Policy Distillation" (Rusu et al., ICLR 2016) and the student-driven variants of
"Distilling Policy Distillation" (Czarnecki et al., AISTATS 2019) over Atari (ale-py) and MinAtar.
"""

__version__ = "0.1.0"
