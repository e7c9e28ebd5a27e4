"""Random and human reference scores for Atari-57, for human-normalised scores.

    human-normalised = (agent - random) / (human - random)        (Mnih et al. 2015, Methods)

0 is a uniformly random policy, 1 a professional human games tester. The values are the 57-game
table used by most Atari work since Mnih et al. 2015 ("Human-level control through deep
reinforcement learning", Nature 518, Extended Data Table 2, for its 49 games), completed for the
other 8 games by later DeepMind papers (Wang et al. 2016; Badia et al. 2020, "Agent57"). They are
copied from DeepMind's DQN Zoo, `dqn_zoo/atari_data.py` (Quan & Ostrovski 2020), the same table
that rliable's Atari-200M data and Agent57 normalise by; a few human values there differ from the
Nature table's (re-measured human scores), so cite this table, not the Nature one, with numbers made
from it. Both reference agents played episodes of at most 108,000 frames after up to 30 no-op
starts, like our protocol (docs/evaluation.md). Keys are our game names (`atari/<ROM name>`).
"""

from __future__ import annotations

SOURCE = ("Atari-57 random/human scores (Mnih et al. 2015, Extended Data Table 2; completed by "
          "Wang et al. 2016 and Badia et al. 2020), as in DeepMind's DQN Zoo dqn_zoo/atari_data.py")

# game: (random, human)
ATARI_RANDOM_HUMAN: dict[str, tuple[float, float]] = {
    "atari/Alien": (227.8, 7127.7),
    "atari/Amidar": (5.8, 1719.5),
    "atari/Assault": (222.4, 742.0),
    "atari/Asterix": (210.0, 8503.3),
    "atari/Asteroids": (719.1, 47388.7),
    "atari/Atlantis": (12850.0, 29028.1),
    "atari/BankHeist": (14.2, 753.1),
    "atari/BattleZone": (2360.0, 37187.5),
    "atari/BeamRider": (363.9, 16926.5),
    "atari/Berzerk": (123.7, 2630.4),
    "atari/Bowling": (23.1, 160.7),
    "atari/Boxing": (0.1, 12.1),
    "atari/Breakout": (1.7, 30.5),
    "atari/Centipede": (2090.9, 12017.0),
    "atari/ChopperCommand": (811.0, 7387.8),
    "atari/CrazyClimber": (10780.5, 35829.4),
    "atari/Defender": (2874.5, 18688.9),
    "atari/DemonAttack": (152.1, 1971.0),
    "atari/DoubleDunk": (-18.6, -16.4),
    "atari/Enduro": (0.0, 860.5),
    "atari/FishingDerby": (-91.7, -38.7),
    "atari/Freeway": (0.0, 29.6),
    "atari/Frostbite": (65.2, 4334.7),
    "atari/Gopher": (257.6, 2412.5),
    "atari/Gravitar": (173.0, 3351.4),
    "atari/Hero": (1027.0, 30826.4),
    "atari/IceHockey": (-11.2, 0.9),
    "atari/Jamesbond": (29.0, 302.8),
    "atari/Kangaroo": (52.0, 3035.0),
    "atari/Krull": (1598.0, 2665.5),
    "atari/KungFuMaster": (258.5, 22736.3),
    "atari/MontezumaRevenge": (0.0, 4753.3),
    "atari/MsPacman": (307.3, 6951.6),
    "atari/NameThisGame": (2292.3, 8049.0),
    "atari/Phoenix": (761.4, 7242.6),
    "atari/Pitfall": (-229.4, 6463.7),
    "atari/Pong": (-20.7, 14.6),
    "atari/PrivateEye": (24.9, 69571.3),
    "atari/Qbert": (163.9, 13455.0),
    "atari/Riverraid": (1338.5, 17118.0),
    "atari/RoadRunner": (11.5, 7845.0),
    "atari/Robotank": (2.2, 11.9),
    "atari/Seaquest": (68.4, 42054.7),
    "atari/Skiing": (-17098.1, -4336.9),
    "atari/Solaris": (1236.3, 12326.7),
    "atari/SpaceInvaders": (148.0, 1668.7),
    "atari/StarGunner": (664.0, 10250.0),
    "atari/Surround": (-10.0, 6.5),
    "atari/Tennis": (-23.8, -8.3),
    "atari/TimePilot": (3568.0, 5229.2),
    "atari/Tutankham": (11.4, 167.6),
    "atari/UpNDown": (533.4, 11693.2),
    "atari/Venture": (0.0, 1187.5),
    "atari/VideoPinball": (16256.9, 17667.9),  # random beats human under some other protocols
    "atari/WizardOfWor": (563.5, 4756.5),
    "atari/YarsRevenge": (3092.9, 54576.9),
    "atari/Zaxxon": (32.5, 9173.3),
}


def human_reference(game: str) -> tuple[float, float] | None:
    """(random, human) reference scores of an Atari game, None for games outside Atari-57."""
    return ATARI_RANDOM_HUMAN.get(game)
