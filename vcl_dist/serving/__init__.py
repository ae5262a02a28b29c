"""Serving a trained model: a Ray Serve search application over an embedded corpus (`.app`)."""
