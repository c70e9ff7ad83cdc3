"""Evaluation: FID, image writers, and the diagnostics train.py runs beside training."""
