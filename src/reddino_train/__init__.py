"""Headless DINOv2 / RedDino pretraining for napari-reddino (``reddino-train``)."""
