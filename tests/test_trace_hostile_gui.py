"""Open Trace with a hostile file: one message naming the file, and the trace on screen stays."""
from __future__ import annotations

import json

import pytest

from tests.test_inference_gui import fake, window  # noqa: F401
from tests.test_main_window import _sandboxed_settings, dialogs, qsettings  # noqa: F401
from tests.test_trace_hostile import HOSTILE
from tests.test_trace_ui import _filters, _open, _trace


@pytest.mark.parametrize("name", ["deep_nesting", "nan_in_json", "ragged_map", "huge_int_digits",
                                  "binary_garbage", "trail_missing_field"])
def test_a_hostile_trace_is_one_message_and_the_trace_on_screen_stays(qtbot, window, dialogs,
                                                                       tmp_path, name):
    good = _trace("grid_attention", maps=_filters(2))
    shown = _open(window, tmp_path, good)
    before = json.dumps(shown.trace.to_dict())
    content, words = HOSTILE[name]
    bad = tmp_path / f"{name}.trace.json"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        bad.write_text(content)
    dialogs.clear()
    assert window.open_trace(bad) is False
    assert len(dialogs) == 1
    title, message = dialogs[0]
    assert message.startswith(bad.name) and words in message and "\n" not in message
    assert window.inference.current is shown
    assert json.dumps(window.inference.current.trace.to_dict()) == before
