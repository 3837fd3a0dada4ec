"""MagLens application: the Qt shell and the ``maglens`` command line.

Kept light on purpose: ``maglens info`` must not load Qt or torch.
"""
