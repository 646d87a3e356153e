"""The vocabulary every layer shares: option registries, the objective, errors, how a task was started,
and a config's identity. OmegaConf only: no TensorFlow, no MLflow."""
