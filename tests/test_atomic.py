"""Atomic writes: the target is the old file or the whole new one, and no temp file stays behind."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from fedmodal.atomic import (
    open_atomically,
    save_atomically,
    write_bytes_atomically,
    write_json_atomically,
    write_text_atomically,
)


def test_bytes_text_and_json_round_trip(tmp_path):
    assert write_bytes_atomically(tmp_path / "a" / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert write_text_atomically(tmp_path / "t.md", "héllo\n").read_text(encoding="utf-8") == "héllo\n"
    path = write_json_atomically(tmp_path / "p.json", {"x": [1, 2]})
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "p.json", "t.md"]


@pytest.mark.parametrize("how", ["save", "open", "json"])
def test_a_writer_that_raises_leaves_the_old_file_and_no_temp(tmp_path, how):
    path = tmp_path / "state.json"
    path.write_text("old")

    def half_then_fail(temp):
        temp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        if how == "save":
            save_atomically(path, half_then_fail)
        elif how == "open":
            with open_atomically(path) as handle:
                handle.write("half")
                raise RuntimeError("disk full")
        else:
            write_json_atomically(path, {"x": object()}, default=_raise_disk_full)  # fails mid-dump
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def _raise_disk_full(_value):
    raise RuntimeError("disk full")


def test_a_writer_that_raises_creates_no_file(tmp_path):
    def fail(temp):
        temp.write_bytes(b"torn")
        raise ValueError("bad")

    with pytest.raises(ValueError):
        save_atomically(tmp_path / "new.pt", fail)
    assert list(tmp_path.iterdir()) == []


def test_path_writers_see_the_target_extension(tmp_path):
    # nibabel picks gzip from ".nii.gz"; torch.save and matplotlib take any name.
    image = nib.Nifti1Image(np.arange(8, dtype=np.int16).reshape(2, 2, 2), np.eye(4))
    nifti = save_atomically(tmp_path / "case_t1.nii.gz", lambda temp: nib.save(image, str(temp)))
    assert nifti.read_bytes()[:2] == b"\x1f\x8b"  # gzip, as the final name asks
    assert np.array_equal(np.asarray(nib.load(str(nifti)).dataobj), np.asarray(image.dataobj))
    weights = save_atomically(tmp_path / "w.pt", lambda temp: torch.save({"w": torch.ones(2)}, temp))
    assert torch.equal(torch.load(weights)["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_t1.nii.gz", "w.pt"]
