"""Data: Kaggle-layout reading and checks, built-in synthetic data, splits and the tf.data pipeline."""
