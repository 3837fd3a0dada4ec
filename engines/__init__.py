"""MagLens engines: slides, sampling, models, inference and training. No Qt.

Kept empty on purpose: ``import engines.slide`` must not load torch.
"""
