"""The training loop and what it needs from Keras: session, optimizers and schedules, distribution
strategies, checkpoints. Keras only: nothing here records to MLflow."""
