"""Training: the run's settings (config.py) and the resume policy (resume.py); train.py runs the loop."""
