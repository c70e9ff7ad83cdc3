"""Training objectives: each maps (network, data batch, labels) to LossTerms."""
