"""One LightningModule per algorithm family; `online` serves PPO, GRPO and the other online RL algorithms."""
