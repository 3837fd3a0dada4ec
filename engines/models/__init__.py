"""The five slide models; build them through ``engines.registry``."""
