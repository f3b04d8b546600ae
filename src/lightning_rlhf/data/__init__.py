"""Synthetic data sources for the CPU demos (see :mod:`lightning_rlhf.data.reviews`)."""
