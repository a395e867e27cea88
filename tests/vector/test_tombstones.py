"""The host's tombstone file: what one process appends, every other reader sees at once, whole."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np

from vector.tombstones import LocalTombstones


def _append_from_child(path: str, labels: list[int]) -> None:
    t = LocalTombstones(Path(path))
    t.append(labels)
    t.close()


def test_reader_sees_labels_appended_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "tomb.bin"
    reader = LocalTombstones(path)
    assert not reader.changed() and reader.read_new().size == 0
    proc = multiprocessing.get_context("spawn").Process(target=_append_from_child, args=(str(path), [7, 2**40, -1]))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert reader.changed()
    assert reader.read_new().tolist() == [7, 2**40, -1]
    assert not reader.changed() and reader.read_new().size == 0  # each label is delivered once
    _append_from_child(str(path), [9])
    assert reader.read_new().tolist() == [9]
    late = LocalTombstones(path)  # a worker starting later reads the whole history
    assert late.read_new().tolist() == [7, 2**40, -1, 9]
    reader.close()
    late.close()


def test_partial_record_is_left_for_the_next_read(tmp_path: Path) -> None:
    path = tmp_path / "tomb.bin"
    reader = LocalTombstones(path)
    with path.open("ab") as f:  # a writer caught half-way through one 8-byte label
        f.write(np.asarray([5], "<i8").tobytes() + b"\x01\x00\x00")
    assert reader.read_new().tolist() == [5]
    with path.open("ab") as f:
        f.write(b"\x00\x00\x00\x00\x00")
    assert reader.read_new().tolist() == [1]
    reader.close()


def test_file_is_private(tmp_path: Path) -> None:
    t = LocalTombstones(tmp_path / "sub" / "tomb.bin")
    t.append([1])
    assert (tmp_path / "sub" / "tomb.bin").stat().st_mode & 0o077 == 0
    t.close()
