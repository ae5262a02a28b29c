"""Serving a trained dual encoder: export and load it, embed a corpus with Ray Data, search it, report on it."""

from ..models.export import export_model
from .model import RetrievalModel, load_model

__all__ = ["RetrievalModel", "export_model", "load_model"]
