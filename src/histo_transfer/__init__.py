"""Tracked Keras transfer-learning runs for metastatic-cancer detection on 96x96 H&E patches."""

IMAGE_SHAPE = (96, 96, 3)
