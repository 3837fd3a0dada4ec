"""The Help menu: Keyboard Shortcuts (read from the window's own actions when opened, so the
list is never out of date) and About (versions of MagLens and the libraries it runs on)."""
from __future__ import annotations

import html
import importlib.metadata
import platform

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QHeaderView,
    QLabel,
    QMainWindow,
    QMenu,
    QMessageBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.settings import APPLICATION

# What the canvas does itself, without an action (keys it handles and mouse gestures).
CANVAS_BINDINGS: tuple[tuple[str, str], ...] = (
    ("Pan", "Arrow keys, or drag"),
    ("Zoom around the cursor", "Mouse wheel"),
    ("Fit the slide", "Double-click"),
    ("Draw a rectangle to run a model on", "Shift+drag"),
    ("Move the view", "Click or drag in the minimap"),
)


def _plain(text: str) -> str:
    """Menu text without mnemonics or an ellipsis: '&Open…' -> 'Open'."""
    return text.replace("&&", "\0").replace("&", "").replace("\0", "&").rstrip("…").rstrip(".").strip()


def _menu_of(action: QAction) -> str:
    for obj in action.associatedObjects():
        if isinstance(obj, QMenu) and obj.title():
            return _plain(obj.title())
    return ""


def shortcut_rows(window: QWidget) -> list[tuple[str, str, str]]:
    """(menu, command, keys) for every action of ``window`` that has a shortcut, in menu order."""
    rows: list[tuple[str, str, str]] = []
    seen: set[int] = set()
    for action in window.findChildren(QAction):
        if id(action) in seen or not action.shortcuts() or action.isSeparator():
            continue
        seen.add(id(action))
        keys = ", ".join(s.toString(QKeySequence.SequenceFormat.NativeText) for s in action.shortcuts()
                         if not s.isEmpty())
        if keys:
            rows.append((_menu_of(action), _plain(action.text()), keys))
    menus = [_plain(a.text()) for a in window.menuBar().actions()] if isinstance(window, QMainWindow) else []
    order = {name: i for i, name in enumerate(menus)}
    return sorted(rows, key=lambda r: order.get(r[0], len(order)))  # stable within a menu


class ShortcutsDialog(QDialog):
    """A table of every shortcut: the window's actions, then what the canvas does itself."""

    def __init__(self, window: QMainWindow) -> None:
        super().__init__(window)
        self.setWindowTitle(f"{APPLICATION} Keyboard Shortcuts")
        self.setObjectName("shortcuts_dialog")
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["Menu", "Command", "Keys"])
        self.table.verticalHeader().hide()
        self.table.verticalHeader().setDefaultSectionSize(self.table.fontMetrics().height() + 8)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.close)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table)
        layout.addWidget(buttons)
        self.resize(560, 620)
        self.refresh(window)

    def refresh(self, window: QMainWindow) -> None:
        rows = shortcut_rows(window) + [("Canvas", what, keys) for what, keys in CANVAS_BINDINGS]
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                self.table.setItem(r, c, QTableWidgetItem(text))

    def rows(self) -> list[tuple[str, str, str]]:
        return [tuple(self.table.item(r, c).text() for c in range(3)) for r in range(self.table.rowCount())]


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Versions worth quoting in a bug report. torch is read from its package metadata, not
    imported: importing it takes seconds and must not happen on the GUI thread."""
    import PySide6
    from PySide6.QtCore import qVersion

    try:
        import openslide

        openslide_text = f"{openslide.__library_version__} (openslide-python {openslide.__version__})"
    except Exception as exc:  # noqa: BLE001 - the About box reports, it never fails
        openslide_text = f"unavailable ({type(exc).__name__})"
    return {
        APPLICATION: _dist_version("maglens"),
        "Qt": qVersion(),
        "PySide6": PySide6.__version__,
        "OpenSlide": openslide_text,
        "PyTorch": _dist_version("torch"),
        "Python": platform.python_version(),
    }


def about_html() -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>&nbsp;&nbsp;{html.escape(v)}</td></tr>"
                   for k, v in versions().items())
    return (f"<h3>{APPLICATION}</h3><p>A whole-slide image viewer that shows where attention "
            f"models look.</p><table>{rows}</table>")


def show_shortcuts(window: QMainWindow) -> ShortcutsDialog:
    dialog = getattr(window, "shortcuts_dialog", None)
    if dialog is None:
        dialog = ShortcutsDialog(window)
        window.shortcuts_dialog = dialog
    else:
        dialog.refresh(window)  # actions added since it was last open show up
    dialog.show()
    dialog.raise_()
    return dialog


def show_about(window: QMainWindow) -> QMessageBox:
    box = QMessageBox(window)
    box.setWindowTitle(f"About {APPLICATION}")
    box.setObjectName("about_box")
    box.setTextFormat(Qt.TextFormat.RichText)
    box.setText(about_html())
    box.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    box.setStandardButtons(QMessageBox.StandardButton.Ok)
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    window.about_box = box
    box.open()  # window-modal without blocking the event loop
    return box


def install_help_menu(window: QMainWindow) -> QMenu:
    """Add Help > Keyboard Shortcuts (F1) and Help > About MagLens to ``window``."""
    menu = window.menuBar().addMenu("&Help")
    shortcuts = QAction("&Keyboard Shortcuts…", window)
    shortcuts.setShortcut(QKeySequence(Qt.Key.Key_F1))
    shortcuts.triggered.connect(lambda _checked=False: show_shortcuts(window))
    about = QAction(f"&About {APPLICATION}", window)
    about.setMenuRole(QAction.MenuRole.AboutRole)
    about.triggered.connect(lambda _checked=False: show_about(window))
    for action in (shortcuts, about):
        window.addAction(action)  # works while the menu bar is hidden, like the others
        menu.addAction(action)
    window.shortcuts_action, window.about_action = shortcuts, about
    return menu
