"""Training data: manifests of slides with slide-level labels.

A manifest is a CSV with header ``slide,label[,split]``; slide paths are relative to the
manifest's folder. Every problem is reported row by row before any training starts:
unreadable rows (wrong number of fields, empty slide, unknown split), missing or unreadable
slide files, a slide listed twice (above all in two splits, which would leak validation data
into training, or with two labels, also when two paths name one file) and labels that differ
only by case or spaces. Columns other than slide, label and split are ignored with a warning.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engines.slide import Slide, SlideError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
COLUMNS = ("slide", "label", "split")
MAX_SHOWN = 20  # problems listed in a ManifestError's message; the rest are counted
# Row numbers in messages: the first data row is row 1 (the header is row 0). Set to 1 to
# count the header as row 1, as a text editor numbers lines.
HEADER_ROW = 0

_warned: set[tuple[str, str]] = set()  # (manifest, warning) already logged by this process


class ManifestError(ValueError):
    """The manifest cannot be used; ``problems`` lists each one (row numbers are 1-based
    data rows: the first row after the header is row 1). ``shown`` is the list capped at
    ``MAX_SHOWN`` lines, the last one saying how many more there are."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        extra = len(problems) - MAX_SHOWN
        self.shown = problems[:MAX_SHOWN] + ([f"... and {extra} more"] if extra > 0 else [])
        super().__init__("manifest problems:\n  " + "\n  ".join(self.shown))


class CheckCancelled(Exception):
    """A manifest check was cancelled through its ``cancel`` event."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    split: str
    row: int


@dataclass
class Dataset:
    samples: list[Sample]
    classes: list[str]
    warnings: list[str] = field(default_factory=list)  # e.g. extra columns; not fatal

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def label_index(self, sample: Sample) -> int:
        return self.classes.index(sample.label)

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: count}} for previews."""
        out: dict[str, dict[str, int]] = {}
        for s in self.samples:
            out.setdefault(s.split, {c: 0 for c in self.classes})[s.label] += 1
        return out


@dataclass(frozen=True)
class _Row:
    row: int
    name: str  # as written in the manifest
    path: Path
    label: str
    split: str


class _Problems:
    """Problems keyed by row, listed in row order; manifest-wide ones come last."""

    def __init__(self) -> None:
        self._rows: list[tuple[int, str]] = []
        self._whole: list[str] = []

    def row(self, row: int, text: str) -> None:
        self._rows.append((row, f"row {row}: {text}"))

    def whole(self, text: str) -> None:
        self._whole.append(text)

    def __bool__(self) -> bool:
        return bool(self._rows or self._whole)

    def lines(self) -> list[str]:
        return [t for _, t in sorted(self._rows, key=lambda rt: rt[0])] + self._whole


def parse_manifest_rows(path: str | Path):
    """The rows of a manifest with the checks that need no slide opened (fields, splits, the
    same slide twice, labels differing only by case or spaces): ``(rows, warnings,
    problems)``. Training (``read_manifest``) and cohort inference both start here."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError([f"{path}: cannot be read ({exc})"]) from None
    problems = _Problems()
    rows, warnings = _parse(text, path, problems)
    _check_duplicates(rows, problems)
    _check_spelling(rows, problems)
    return rows, warnings, problems


def read_manifest(path: str | Path, seed: int = 0, check_slides: bool = True,
                  classes: list[str] | None = None,
                  fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                  cancel: threading.Event | None = None) -> Dataset:
    """Parse and validate a manifest; raise ManifestError listing every problem.

    ``check_slides`` opens every slide (slow for many slides; ``cancel`` is checked between
    them and raises CheckCancelled). Warnings (extra columns) are returned in
    ``Dataset.warnings`` and logged once per process as ``warning: ...``."""
    path = Path(path)
    rows, warnings, problems = parse_manifest_rows(path)
    _check_files(rows, problems, check_slides, cancel)
    found = sorted({r.label for r in rows if r.label})
    if classes is None:
        classes = found
    else:
        for r in rows:
            if r.label and r.label not in classes:
                problems.row(r.row, f"{r.name}: label {r.label!r} is not one of {', '.join(classes)}")
    if not rows and not problems:
        problems.whole(f"{path.name}: no slides listed")
    if rows and len(found) < 2:
        problems.whole(f"{path.name}: only one class ({', '.join(found) or 'none'}); "
                       "training needs at least two")
    if problems:
        raise ManifestError(problems.lines())
    for w in warnings:
        _warn_once(path, w)
    splits = [r.split for r in rows]
    if not all(splits):
        # Seeded split for rows that do not name one.
        todo = [k for k, s in enumerate(splits) if not s]
        drawn = stratified_split([rows[k].label for k in todo], fractions, np.random.default_rng(seed))
        for k, s in zip(todo, drawn):
            splits[k] = s
    samples = [Sample(r.path, r.label, s, r.row) for r, s in zip(rows, splits)]
    if not any(s.split == "train" for s in samples):
        raise ManifestError([f"{path.name}: no slide is in the train split"])
    return Dataset(samples, list(classes), warnings)


def _warn_once(path: Path, text: str) -> None:
    key = (str(path.resolve()), text)
    if key not in _warned:
        _warned.add(key)
        log.warning("warning: %s", text)


def _parse(text: str, path: Path, problems: _Problems) -> tuple[list[_Row], list[str]]:
    """Rows that can be read, with every unreadable row and header problem recorded."""
    reader = csv.reader(io.StringIO(text))  # keeps a quoted field's line breaks inside it
    try:
        header = [h.strip() for h in next(reader, [])]
    except csv.Error as exc:
        raise ManifestError([f"{path.name}: the header cannot be parsed ({exc})"]) from None
    missing = [c for c in ("slide", "label") if c not in header]
    if missing:
        raise ManifestError([f"{path.name}: missing column(s) {', '.join(missing)} "
                             f"(header must be slide,label[,split]; found {','.join(header) or 'nothing'})"])
    twice = sorted({h for h in header if h in COLUMNS and header.count(h) > 1})
    if twice:
        raise ManifestError([f"{path.name}: column(s) {', '.join(twice)} appear more than once in the header"])
    warnings: list[str] = []
    extra = [h or f"(unnamed column {i + 1})" for i, h in enumerate(header) if h not in COLUMNS]
    if extra:
        warnings.append(f"manifest {path.name}: column(s) {', '.join(extra)} ignored "
                        "(MagLens reads slide, label and split)")
    col = {h: header.index(h) for h in COLUMNS if h in header}
    rows: list[_Row] = []
    base = path.parent
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.row(reader.line_num - 1 + HEADER_ROW, f"cannot be parsed ({exc})")
            break
        row = reader.line_num - 1 + HEADER_ROW
        fields = [f.strip() for f in fields]
        if not any(fields):
            continue  # a blank line, or a spreadsheet's empty row of commas
        # Trailing empty fields beyond the header are an export artefact, not a misread row.
        while len(fields) > len(header) and not fields[-1]:
            fields.pop()
        if len(fields) != len(header):
            hint = " (a path with a comma needs quotes)" if len(fields) > len(header) else ""
            problems.row(row, f"{len(fields)} field(s) where the header has {len(header)}{hint}")
            continue
        name, label = fields[col["slide"]], fields[col["label"]]
        split = fields[col["split"]] if "split" in col else ""
        if not name:
            problems.row(row, "empty slide path")
            continue
        if not label:
            problems.row(row, f"{name}: empty label")
        if split and split not in SPLITS:
            problems.row(row, f"{name}: unknown split {split!r} (use train, val or test)")
        slide_path = Path(name) if Path(name).is_absolute() else base / name
        rows.append(_Row(row, name, slide_path, label, split))
    return rows, warnings


def _identity(path: Path) -> tuple:
    """What makes two paths the same slide: the file itself when it exists (links, ``..``
    and other spellings of one file agree), else the normalised absolute path."""
    try:
        st = path.stat()
        return ("file", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.normcase(os.path.realpath(path)))


def _check_duplicates(rows: list[_Row], problems: _Problems) -> None:
    first: dict[tuple, _Row] = {}
    for r in rows:
        seen = first.setdefault(_identity(r.path), r)
        if seen is r:
            continue
        alias = f" ({seen.name})" if seen.name != r.name else ""
        what = f"{r.name}: same slide as row {seen.row}{alias}"
        if r.split and seen.split and r.split != seen.split:
            what += (f", in split {r.split} here and {seen.split} there "
                     "(a slide in two splits leaks validation data into training)")
        if r.label and seen.label and r.label != seen.label:
            what += f", with label {r.label!r} here and {seen.label!r} there"
        if what.endswith(f"row {seen.row}{alias}"):
            what += "; list each slide once"
        problems.row(r.row, what)


def _label_key(label: str) -> str:
    return "".join(label.split()).casefold()


def _check_spelling(rows: list[_Row], problems: _Problems) -> None:
    """Labels that differ only by case or spaces are almost always one class mistyped."""
    first: dict[str, _Row] = {}
    for r in rows:
        if not r.label:
            continue
        seen = first.setdefault(_label_key(r.label), r)
        if seen.label != r.label:
            problems.row(r.row, f"{r.name}: label {r.label!r} differs from {seen.label!r} (row {seen.row}) "
                                "only by case or spaces; probably a typo, use one spelling")


def _check_files(rows: list[_Row], problems: _Problems, check_slides: bool,
                 cancel: threading.Event | None) -> None:
    opened: dict[tuple, str | None] = {}  # a slide listed twice is opened once
    for r in rows:
        if cancel is not None and cancel.is_set():
            raise CheckCancelled()
        if not r.path.exists():
            problems.row(r.row, f"{r.name}: file not found")
            continue
        if not check_slides:
            continue
        key = _identity(r.path)
        if key not in opened:
            try:
                Slide(r.path).close()
                opened[key] = None
            except SlideError as exc:
                opened[key] = str(exc)
        if opened[key] is not None:
            problems.row(r.row, opened[key])


def stratified_split(labels: list[str], fractions: tuple[float, float, float],
                     rng: np.random.Generator) -> list[str]:
    """Seeded split: each label spread over train/val/test by ``fractions``; with three or
    more slides of a label, val and test get at least one each."""
    splits = [""] * len(labels)
    for lab in sorted(set(labels)):
        idx = [i for i, v in enumerate(labels) if v == lab]
        rng.shuffle(idx)
        n = len(idx)
        n_val = int(round(n * fractions[1]))
        n_test = int(round(n * fractions[2]))
        if n >= 3:
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        for j, i in enumerate(idx):
            splits[i] = "val" if j < n_val else "test" if j < n_val + n_test else "train"
    return splits
