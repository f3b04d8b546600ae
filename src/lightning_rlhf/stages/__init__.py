"""The three training stages (sft, rm, ppo) and the pipeline that chains them."""
