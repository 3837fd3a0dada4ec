"""Qt widgets that show a slide: the canvas, its tile loader and cache, minimap, scale bar
and overlays. Imports ``engines.slide`` and ``engines.trace`` only; never torch."""
from viewer._qtfix import guard_signal_refcounts

guard_signal_refcounts()
