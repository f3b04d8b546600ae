"""`PPOModule`, the name PPO users know: the online RL family's LightningModule with cfg.algorithm=ppo
(algorithms/online.py serves every online algorithm)."""

from lightning_rlhf.algorithms.online import FROZEN_PREFIXES, OnlineAlgorithm, OnlineRLModule

PPOModule = OnlineRLModule

__all__ = ["FROZEN_PREFIXES", "OnlineAlgorithm", "OnlineRLModule", "PPOModule"]
