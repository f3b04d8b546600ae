"""lightning-rlhf: PPO for causal language models on PyTorch Lightning + Hydra.

Kept light on purpose: importing the math (``lightning_rlhf.losses``, ``lightning_rlhf.advantages``)
must not import deepspeed, wandb or lightning.
"""

__version__ = "0.1.0"
