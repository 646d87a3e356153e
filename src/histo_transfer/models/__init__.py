"""Backbone registry and the classifier built on it. Importing this package does not import Keras."""
