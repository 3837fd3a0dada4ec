"""Shared fixtures: the bundled slides, and offscreen Qt."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
DEMO_SLIDE = ROOT / "resources" / "CMU-1-Small-Region.svs"
GOOD_SLIDES = [DEMO_SLIDE] + sorted(p for p in DATA.iterdir() if p.is_file() and p.suffix != ".md")
BAD_SLIDES = sorted((DATA / "bad").iterdir())


@pytest.fixture(autouse=True)
def _few_torch_threads():
    # Two cores on CI: keep tests from oversubscribing them.
    try:
        import sys

        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
    except Exception:  # noqa: BLE001
        pass
    yield


@pytest.fixture
def demo_slide_path() -> Path:
    return DEMO_SLIDE


@pytest.fixture
def truncated_slide(tmp_path) -> Path:
    """A DICOM slide cut in half: its header opens, every tile read then fails."""
    data = (DATA / "wsi-jpeg.dcm").read_bytes()
    out = tmp_path / "truncated.dcm"
    out.write_bytes(data[: len(data) // 2])
    return out


@pytest.fixture
def truncated_svs(tmp_path) -> Path:
    """The demo slide cut short: it no longer opens at all."""
    data = DEMO_SLIDE.read_bytes()
    out = tmp_path / "truncated.svs"
    out.write_bytes(data[: len(data) // 3])
    return out


def skip_without_localhost_ddp() -> None:
    """Skip a torchrun test where torch.distributed or a localhost socket is missing."""
    import socket

    import torch.distributed as dist

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
        listening = True
    except OSError:
        listening = False
    if not dist.is_available() or not listening:
        pytest.skip("torch.distributed or a localhost socket is not available here")

