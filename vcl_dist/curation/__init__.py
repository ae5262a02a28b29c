"""Curating a dataset before training: score every image–caption pair with a model, drop exact
duplicate images, keep the pairs above a score or the best fraction, and write the kept rows as
shards (``jobs/filter.py``)."""
