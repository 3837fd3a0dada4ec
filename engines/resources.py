"""Where MagLens's bundled files live, in a source checkout and in an installed wheel alike.

The files are package data of the ``resources`` package and are found through
``importlib.resources``, so nothing depends on the current directory or on the source tree.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

PACKAGE = "resources"
DEMO_SLIDE_NAME = "CMU-1-Small-Region.svs"


def resources_root() -> Path:
    """The folder holding the bundled files."""
    try:
        root = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError:
        # A checkout run without installing: the folder sits next to ``engines``.
        return Path(__file__).resolve().parents[1] / PACKAGE
    # Installed as plain files (wheel, editable or checkout), so the traversable is a path.
    path = Path(str(root))
    if not (path / "textures").is_dir():
        # Some other distribution's ``resources`` shadowed ours: use the checkout's folder.
        return Path(__file__).resolve().parents[1] / PACKAGE
    return path


def resource_path(*parts: str) -> Path:
    """A bundled file or folder, e.g. ``resource_path("checkpoints", "magnet.pt")``; the path
    may not exist (callers check, as for a model without a demo checkpoint)."""
    return resources_root().joinpath(*parts)


def demo_slide() -> Path:
    return resource_path(DEMO_SLIDE_NAME)
