"""Check the system libraries Qt's xcb (X11) platform plugin loads, before the viewer starts.

PySide6's wheels bundle Qt but not the X11/GL libraries its xcb plugin links against; on a
fresh Debian/Ubuntu desktop ``libxcb-cursor0`` alone is usually missing, and Qt then dies with
"Could not load the Qt platform plugin 'xcb'". This names the exact packages instead.

    python3 tools/check_qt_deps.py            # exit 0 when all are there, else 2 and the fix
    python3 tools/check_qt_deps.py --install  # (make deps) install the missing packages

Only checked when a display is in use: QT_QPA_PLATFORM unset or xcb (offscreen needs none).
MAGLENS_PRETEND_MISSING="libxcb-cursor.so.0 ..." treats those libraries as missing (tests).
Standard library only: it runs with the system python3, before the virtual environment exists.
"""
from __future__ import annotations

import argparse
import ctypes.util
import os
import shutil
import subprocess
import sys
from typing import Callable, Iterable

# soname -> Debian/Ubuntu package; what libqxcb.so and libQt6XcbQpa/Gui/DBus link to outside
# the wheel (from ldd on PySide6 6.x).
QT_XCB_LIBRARIES: dict[str, str] = {
    "libxcb.so.1": "libxcb1",
    "libX11.so.6": "libx11-6",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libEGL.so.1": "libegl1",
    "libGL.so.1": "libgl1",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libdbus-1.so.3": "libdbus-1-3",
    "libglib-2.0.so.0": "libglib2.0-0",
}


def needs_display_libraries(env: dict[str, str] | os._Environ = os.environ) -> bool:
    """Qt picks xcb when QT_QPA_PLATFORM is unset (on X11) or names it."""
    platform = env.get("QT_QPA_PLATFORM", "").strip().lower()
    return platform == "" or platform.split(":")[0].split(";")[0] == "xcb"


def ldconfig_libraries() -> set[str] | None:
    """Sonames the dynamic loader knows (``ldconfig -p``), or None when it cannot be asked."""
    for exe in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        names = {line.split(" (", 1)[0].strip() for line in out.splitlines()[1:] if " => " in line}
        if names:
            return names
    return None


def system_has(known: set[str] | None) -> Callable[[str], bool]:
    """A test for one soname: the ldconfig cache, else ctypes' own search."""
    def has(soname: str) -> bool:
        if known is not None:
            return soname in known
        stem = soname[3:].split(".so", 1)[0]  # libxcb-cursor.so.0 -> xcb-cursor
        return ctypes.util.find_library(stem) is not None
    return has


def missing_packages(has: Callable[[str], bool], pretend_missing: Iterable[str] = ()) -> list[str]:
    """Debian packages to install, in a stable order, for the libraries that are absent."""
    pretend = set(pretend_missing)
    packages: list[str] = []
    for soname, package in QT_XCB_LIBRARIES.items():
        if (soname in pretend or not has(soname)) and package not in packages:
            packages.append(package)
    return packages


def install_command(packages: list[str], root: bool) -> list[str]:
    prefix = [] if root else ["sudo"]
    return prefix + ["apt-get", "install", "-y", *packages]


def _pretend_from_env() -> list[str]:
    return os.environ.get("MAGLENS_PRETEND_MISSING", "").split()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the libraries Qt's xcb plugin needs.")
    parser.add_argument("--install", action="store_true",
                        help="install the missing packages with apt-get (as root)")
    parser.add_argument("--dry-run", action="store_true", help="with --install: only print")
    args = parser.parse_args(argv)

    if not args.install and not needs_display_libraries():
        return 0  # offscreen, wayland, vnc...: the xcb plugin is not loaded
    if not sys.platform.startswith("linux"):
        return 0
    packages = missing_packages(system_has(ldconfig_libraries()), _pretend_from_env())
    if not packages:
        if args.install:
            print("All the system libraries Qt's xcb plugin needs are installed.")
        return 0
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    command = install_command(packages, root)
    line = " ".join(command)
    has_apt = shutil.which("apt-get") is not None
    if not args.install:
        print(f"MagLens: Qt's X11 (xcb) plugin needs system libraries that are missing: "
              f"{', '.join(packages)}", file=sys.stderr)
        if has_apt:
            print(f"Install them with:\n    {line}\n(or run `make deps`), then `make run` again.",
                  file=sys.stderr)
        else:
            print("Install your distribution's packages for those libraries (the names above "
                  "are Debian/Ubuntu's).", file=sys.stderr)
        print("To run without a display, set QT_QPA_PLATFORM=offscreen.", file=sys.stderr)
        return 2
    if not root or not has_apt:
        why = "apt-get was not found" if not has_apt else "this needs root"
        print(f"MagLens: {why}; run:\n    {line}", file=sys.stderr)
        return 1
    print(line, flush=True)
    if args.dry_run:
        return 0
    result = subprocess.run(command)
    if result.returncode != 0:
        # A fresh container has no package lists yet.
        print("apt-get failed; if it could not find the packages, run `apt-get update` first.",
              file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
