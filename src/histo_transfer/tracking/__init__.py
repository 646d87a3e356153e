"""Everything MLflow: the store and a run's lifecycle, the outbox, redaction, parent runs, the model
registry and the tracking schema (run kinds, tag keys, artifact paths)."""
