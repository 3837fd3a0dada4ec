"""Training data: manifests of slides with slide-level labels.

A manifest is a CSV with header ``slide,label[,split]``; slide paths are relative to the
manifest's folder. Every problem is reported row by row before any training starts.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.slide import Slide, SlideError

SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """The manifest cannot be used; ``problems`` lists each one (row numbers are 1-based
    data rows, as a spreadsheet shows them after the header)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        super().__init__("manifest problems:\n  " + "\n  ".join(shown))


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


def read_manifest(path: str | Path, seed: int = 0, check_slides: bool = True,
                  classes: list[str] | None = None,
                  fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> Dataset:
    """Parse and validate a manifest; raise ManifestError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError([f"{path}: cannot be read ({exc})"]) from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in ("slide", "label") if c not in header]
    if missing:
        raise ManifestError([f"{path.name}: missing column(s) {', '.join(missing)} "
                             f"(header must be slide,label[,split]; found {','.join(header) or 'nothing'})"])
    problems: list[str] = []
    rows: list[tuple[int, Path, str, str]] = []
    base = path.parent
    for i, raw in enumerate(reader, start=1):
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
        name, label, split = row.get("slide", ""), row.get("label", ""), row.get("split", "")
        if not name:
            problems.append(f"row {i}: empty slide path")
            continue
        if not label:
            problems.append(f"row {i}: {name}: empty label")
        if split and split not in SPLITS:
            problems.append(f"row {i}: {name}: unknown split {split!r} (use train, val or test)")
        slide_path = (base / name) if not Path(name).is_absolute() else Path(name)
        if not slide_path.exists():
            problems.append(f"row {i}: {name}: file not found")
        elif check_slides:
            try:
                Slide(slide_path).close()
            except SlideError as exc:
                problems.append(f"row {i}: {exc}")
        rows.append((i, slide_path, label, split))
    if not rows and not problems:
        problems.append(f"{path.name}: no slides listed")
    found = sorted({r[2] for r in rows if r[2]})
    if classes is None:
        classes = found
    else:
        for i, p, label, _ in rows:
            if label and label not in classes:
                problems.append(f"row {i}: {p.name}: label {label!r} is not one of {', '.join(classes)}")
    if rows and len(found) < 2:
        problems.append(f"{path.name}: only one class ({', '.join(found) or 'none'}); training needs at least two")
    if problems:
        raise ManifestError(problems)
    splits = [r[3] for r in rows]
    if not all(splits):
        # Seeded split for rows that do not name one.
        todo = [k for k, s in enumerate(splits) if not s]
        drawn = stratified_split([rows[k][2] for k in todo], fractions, np.random.default_rng(seed))
        for k, s in zip(todo, drawn):
            splits[k] = s
    samples = [Sample(p, label, s, i) for (i, p, label, _), s in zip(rows, splits)]
    if not any(s.split == "train" for s in samples):
        raise ManifestError([f"{path.name}: no slide is in the train split"])
    return Dataset(samples, list(classes))


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
