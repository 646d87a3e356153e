"""Scoring what a model predicts: metrics and their report, inference with test-time augmentation and
ensembles, submissions, Grad-CAM. No MLflow."""
