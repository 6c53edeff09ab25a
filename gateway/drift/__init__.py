"""Drift monitoring: live inputs and scores against the training distribution of each version."""
