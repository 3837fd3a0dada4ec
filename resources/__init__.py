"""Data shipped with MagLens: the demo slide, demo checkpoints and synthetic-slide textures.

A package (not code) so that wheels carry it as package data; find files with
``engines.resources.resource_path``.
"""
