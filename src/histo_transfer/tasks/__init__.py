"""The entry layer: the Hydra CLI, the sweep callback, config validation, and one module per entrypoint
(each composes its own config, validates it once and calls its workflow)."""
