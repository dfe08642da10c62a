"""``spnn-fast recommend --users FILE``: the file is decoded as the data loader decodes data."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from spnn_fast.recommend import select_users


def _log(ids):
    ids = np.array(ids)
    return SimpleNamespace(user_ids=ids, num_users=len(ids))


@pytest.mark.parametrize(
    ("data", "ids", "rows"),
    [
        ("\ufeff1\n3\n".encode(), [1, 2, 3], [0, 2]),  # a BOM is not part of the first id
        ("\u00e91\r\n\r\nb\r\n".encode("latin-1"), ["b", "\u00e91"], [1, 0]),  # latin-1, CRLF
        ("\u00e91\nb".encode(), ["b", "\u00e91"], [1, 0]),  # UTF-8, no final line end
    ],
)
def test_users_file_is_decoded_as_data_are(tmp_path, data, ids, rows):
    path = tmp_path / "users.txt"
    path.write_bytes(data)
    assert select_users(_log(ids), str(path)).tolist() == rows


def test_users_file_errors_name_the_flag_and_the_file(tmp_path):
    path = tmp_path / "users.txt"
    path.write_bytes("\ufeffx\n".encode())
    with pytest.raises(ValueError, match=rf"--users {path}: 1 of 1 ids are not users of the data "
                                         rf"set \(first: x\)"):  # fmt: skip
        select_users(_log(["y"]), str(path))
    path.write_bytes(b"\xef\xbb\xbf \n\n")
    with pytest.raises(ValueError, match=rf"--users {path} lists no user ids"):
        select_users(_log(["y"]), str(path))


def test_an_unreadable_users_file_names_the_flag(tmp_path, monkeypatch):
    import spnn_fast._tables as tables

    path = tmp_path / "users.txt"
    path.write_text("1\n")

    def refuse(p):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(tables, "read_text", refuse)
    with pytest.raises(OSError, match=rf"--users {path}: cannot read it \(Permission denied\)"):
        select_users(_log([1]), str(path))
