"""Things drawn over the slide in level-0 coordinates."""
from viewer.overlays.base import Overlay, camera_transform

__all__ = ["Overlay", "camera_transform"]
