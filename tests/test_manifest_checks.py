"""Manifests checked as a user writes them by hand: each kind of mistake is reported on its
own row (data rows count from 1 after the header), every problem at once, before any
training; extra columns only warn."""
from __future__ import annotations

import logging
import os
import threading

import numpy as np
import pytest
from PIL import Image

from app import cli
from engines.data import CheckCancelled, ManifestError, read_manifest


@pytest.fixture
def slides(tmp_path):
    """Six tiny PNG slides a.png … f.png in tmp_path, and a sub-folder for relative paths."""
    rng = np.random.default_rng(0)
    for name in "abcdef":
        img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / f"{name}.png")
    (tmp_path / "sub").mkdir()
    return tmp_path


def write(folder, text: str):
    m = folder / "m.csv"
    m.write_text(text)
    return m


def problems(path, **kw) -> list[str]:
    with pytest.raises(ManifestError) as err:
        read_manifest(path, **kw)
    return err.value.problems


GOOD = "a.png,normal,train\nb.png,tumor,train\nc.png,normal,val\nd.png,tumor,val\n"


def test_a_good_manifest_reads_without_problems_or_warnings(slides):
    ds = read_manifest(write(slides, "slide,label,split\n" + GOOD))
    assert [s.path.name for s in ds.samples] == ["a.png", "b.png", "c.png", "d.png"]
    assert [s.row for s in ds.samples] == [1, 2, 3, 4]
    assert ds.classes == ["normal", "tumor"] and ds.warnings == []


def test_a_slide_in_two_splits_is_an_error_naming_both_rows(slides):
    m = write(slides, "slide,label,split\n" + GOOD + "a.png,normal,val\n")
    (p,) = problems(m)
    assert p.startswith("row 5: a.png: same slide as row 1")
    assert "split val here and train there" in p


def test_the_same_file_through_other_paths_is_found(slides):
    os.symlink(slides / "b.png", slides / "link.png")
    m = write(slides, "slide,label,split\n" + GOOD + "sub/../a.png,normal,test\n"
              f"{slides / 'c.png'},normal,val\nlink.png,tumor,test\n")
    found = problems(m)
    assert len(found) == 3
    assert found[0].startswith("row 5: sub/../a.png: same slide as row 1 (a.png)") and "split test here" in found[0]
    assert found[1].startswith(f"row 6: {slides / 'c.png'}: same slide as row 3 (c.png)")
    assert "list each slide once" in found[1]
    assert found[2].startswith("row 7: link.png: same slide as row 2 (b.png)")


def test_one_slide_with_two_labels_is_an_error(slides):
    m = write(slides, "slide,label,split\n" + GOOD + "b.png,normal,train\n")
    (p,) = problems(m)
    assert p.startswith("row 5: b.png: same slide as row 2") and "label 'normal' here and 'tumor' there" in p


def test_labels_differing_only_by_case_or_spaces_are_a_likely_typo(slides):
    m = write(slides, "slide,label,split\n" + GOOD + "e.png,Tumor ,train\nf.png,nor mal,val\n")
    found = problems(m)
    assert len(found) == 2
    assert found[0].startswith("row 5: e.png: label 'Tumor' differs from 'tumor' (row 2)")
    assert "typo" in found[0]
    assert found[1].startswith("row 6: f.png: label 'nor mal' differs from 'normal' (row 1)")


def test_unreadable_rows_are_each_reported(slides):
    m = write(slides, "slide,label,split\n" + GOOD
              + "e.png,tumor\n"              # a field short
              + "f.png,tumor,train,extra\n"  # one too many: an unquoted comma in a path
              + ",normal,val\n"              # no slide
              + "e.png,tumor,holdout\n"      # unknown split
              + "\n,,\n")                    # blank and empty rows are skipped
    found = problems(m)
    assert found == [
        "row 5: 2 field(s) where the header has 3",
        "row 6: 4 field(s) where the header has 3 (a path with a comma needs quotes)",
        "row 7: empty slide path",
        "row 8: e.png: unknown split 'holdout' (use train, val or test)",
    ]


def test_every_problem_is_listed_and_the_message_is_capped(slides):
    rows = "".join(f"missing{i}.png,tumor,train\n" for i in range(30))
    m = write(slides, "slide,label,split\n" + GOOD + rows)
    with pytest.raises(ManifestError) as err:
        read_manifest(m)
    assert len(err.value.problems) == 30
    assert err.value.problems[0] == "row 5: missing0.png: file not found"
    text = str(err.value).splitlines()
    assert len(text) == 1 + 20 + 1 and text[-1].strip() == "... and 10 more"


def test_extra_columns_warn_once_and_do_not_stop(slides, caplog):
    m = write(slides, "slide,label,split,notes\n" + GOOD.replace("\n", ",seen by A\n"))
    with caplog.at_level(logging.WARNING, logger="engines.data"):
        ds = read_manifest(m)
        read_manifest(m)
    assert len(ds.samples) == 4
    assert ds.warnings == ["manifest m.csv: column(s) notes ignored (MagLens reads slide, label and split)"]
    logged = [r.getMessage() for r in caplog.records if r.name == "engines.data"]
    assert logged == ["warning: " + ds.warnings[0]]


def test_a_cancelled_check_stops_between_slides(slides):
    m = write(slides, "slide,label,split\n" + GOOD)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CheckCancelled):
        read_manifest(m, cancel=cancel)


def test_cli_train_on_a_bad_manifest_exits_2_with_the_report(slides, capsys):
    m = write(slides, "slide,label,split\n" + GOOD + "a.png,normal,val\ne.png,Tumor,train\n")
    out = slides / "run"
    rc = cli.main(["train", str(m), "--model", "zoom_in", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 2 and stdout == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("maglens train: error: manifest") and "2 problem(s)" in lines[0]
    assert lines[1].strip().startswith("row 5: a.png: same slide as row 1")
    assert lines[2].strip().startswith("row 6: e.png: label 'Tumor' differs from 'tumor'")
    assert len(lines) == 3 and not out.exists()


def test_a_quoted_path_with_a_comma_is_one_field(slides):
    (slides / "a.png").rename(slides / "a,1.png")
    ds = read_manifest(write(slides, 'slide,label,split\n"a,1.png",normal,train\n' + GOOD.split("\n", 1)[1]))
    assert ds.samples[0].path.name == "a,1.png" and len(ds.samples) == 4
