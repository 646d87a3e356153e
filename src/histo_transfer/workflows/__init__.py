"""What a task does, end to end and tracked: a training run, cross-validation, a keras-tuner search,
scoring, comparison, EDA. Configs arrive validated."""
