"""Menu labels for a list of files: the name, and as much of the folder path as it takes to
tell files of the same name apart ("slide.svs — 2021/case-7")."""
from __future__ import annotations

from pathlib import PurePath

SEPARATOR = " — "


def _folders(path: str) -> list[str]:
    """The folders above ``path``'s file, nearest first."""
    parts = PurePath(path).parts[:-1]
    return [p for p in reversed(parts) if p not in ("/", "\\")] or [str(PurePath(path).anchor or "/")]


def _suffix(folders: list[str], depth: int) -> str:
    return "/".join(reversed(folders[:depth]))


def distinguishing_labels(paths: list[str]) -> list[str]:
    """One label per path: "name — parent", with more parent folders (nearest last) only
    where two files share the name and the shorter suffix would not separate them."""
    folders = [_folders(p) for p in paths]
    names = [PurePath(p).name for p in paths]
    depth = [1] * len(paths)
    by_name: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        by_name.setdefault(name, []).append(i)
    for group in by_name.values():
        if len(group) < 2:
            continue
        longest = max(len(folders[i]) for i in group)
        for d in range(1, longest + 1):
            labels = [_suffix(folders[i], d) for i in group]
            if len(set(labels)) == len(labels) or d == longest:
                for i in group:
                    depth[i] = d
                break
    return [f"{names[i]}{SEPARATOR}{_suffix(folders[i], depth[i])}" for i in range(len(paths))]
