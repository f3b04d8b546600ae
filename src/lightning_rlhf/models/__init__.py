"""Models: the policy with its value head, reward models, tiny configs."""
