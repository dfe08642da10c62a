"""The columnar (pyarrow) reader against the csv reader: the same logs and the same errors on
tricky files, which files pyarrow reads, Parquet input, and the loader without pyarrow."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import spnn_fast._formats as formats
from spnn_fast import _arrow
from spnn_fast.data import load

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ARRAYS = ("offsets", "items", "timestamps", "user_ids", "item_ids")
ARROW_MODULES = ("pyarrow", "pyarrow.compute", "pyarrow.csv", "pyarrow.parquet")


def hide_pyarrow(monkeypatch) -> None:
    """Make ``import pyarrow`` fail, as on a machine without it."""
    for name in ARROW_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


def _outcome(path: Path, **kw):
    """What load() makes of a file: the log's arrays (with dtypes), or the error."""
    try:
        log = load(path, min_events=1, **kw).log
    except Exception as e:  # noqa: BLE001 - the error itself is compared
        return type(e).__name__, str(e)
    return {n: (getattr(log, n).dtype.str, getattr(log, n).tolist()) for n in ARRAYS}


def _both(path: Path, monkeypatch, **kw):
    """(pyarrow's outcome, the csv reader's outcome, whether pyarrow read the file: it gave the
    columns, or raised the error)."""
    used = []
    real = formats._read_arrow

    def spy(*args, **kwargs):
        used.append(True)
        got = real(*args, **kwargs)
        used[-1] = got is not None
        return got

    with monkeypatch.context() as m:
        m.setattr(formats, "_read_arrow", spy)
        got = _outcome(path, **kw)
    with monkeypatch.context() as m:
        hide_pyarrow(m)
        want = _outcome(path, **kw)
    return got, want, bool(used and used[-1])


_IDS = ["1", "2", "10", "007", "7", "+7", " 7", "-0", "a", "b", "é", "\u00a0x", "x\u3000",
        "\u0663", "9223372036854775808", "-9223372036854775808", "0x10", "", " ", "u v"]  # fmt: skip
_TIMES = ["5", "881250949.0", "1e3", " 7", "+5", "007", "-5", "0x10", "1.5", "nan", "", "abc",
          "1_000", "9007199254740993", "5\u00a0", "2.", ".5e1", "\u0661"]  # fmt: skip


def _tricky(rng: random.Random, kind: str) -> str:
    """A small file of the format ``kind`` with odd ids, times, quotes, blank lines."""
    bad = rng.choice([0.0, 0.05, 0.3])
    rows = []
    for _ in range(rng.randint(1, 12)):
        u = rng.choice(_IDS) if rng.random() < bad else rng.choice("123ab")
        i = rng.choice(_IDS) if rng.random() < bad else rng.choice(["10", "20", "x", "y z"])
        t = rng.choice(_TIMES) if rng.random() < bad else str(rng.randint(0, 10**9))
        rows.append([u, i, t, "3"])
    if kind == "dat":
        lines = [("::" if rng.random() > 0.02 else ":::").join([u, i, r, t]) for u, i, t, r in rows]
    else:
        delim = "\t" if kind == "inter" else ","
        sp = rng.choice(["", " "]) if kind == "csv" else ""
        head = ["user_id:token", "item_id:token", "timestamp:float", "r:float"]
        lines = [delim.join(head if kind == "inter" else ["user", "item", "timestamp", "r"])]
        for row in rows:
            if kind == "csv" and rng.random() < 0.3:
                row = ['"' + v.replace('"', '""') + '"' for v in row]
            if rng.random() < 0.05:
                row = row[:-1]
            lines.append((delim + sp).join(row))
    for _ in range(rng.choice([0, 1, 2])):
        lines.insert(rng.randint(1, len(lines)), rng.choice(["", "  ", "\t"]))
    nl = rng.choice(["\n", "\r\n"])
    return ("\ufeff" if rng.random() < 0.1 else "") + nl.join(lines) + nl


@pytest.mark.parametrize("kind", ["csv", "inter", "dat"])
def test_pyarrow_reads_as_the_csv_reader(tmp_path, monkeypatch, kind):
    rng = random.Random(kind)
    read = 0
    for k in range(60):
        folder = tmp_path / f"{kind}{k}"
        folder.mkdir()
        name = "ratings.dat" if kind == "dat" else f"f.{kind}"
        text = _tricky(rng, kind)
        path = folder / name
        latin1 = k % 7 == 0 and all(ord(c) < 256 for c in text)
        path.write_bytes(text.encode("latin-1" if latin1 else "utf-8"))
        got, want, used = _both(path, monkeypatch)
        assert got == want, (kind, k, text)
        read += used
    assert read > 20  # most files go through pyarrow


def test_quoted_and_spaced_csv(tmp_path, monkeypatch):
    cases = {
        "quoted.csv": 'user,item,time\n"u, 1",7,1\n"u ""2""",8,2\n"u, 1",7,3\n',
        "spaced.csv": "user, item, time\nu1 , 7 ,1\nu1, 8, 2\n",
        "odd_space_quote.csv": 'user,item,time\nu1, "7",1\n',  # skipinitialspace
        "odd_mid_quote.csv": 'user,item,time\nu"1,7,1\n',
        "blank.csv": "\n  \nuser,item,time\n\n1,2,3\n \t \n1,2,4\n",
        "crlf.csv": "user,item,time\r\n1,2,3\r\n\r\n1,2,4\r\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_bytes(text.encode())
        got, want, used = _both(tmp_path / name, monkeypatch)
        assert got == want, name
        assert used == (not name.startswith("odd")), name  # pyarrow reads the clean ones


@pytest.mark.parametrize("spread", [1, 10**15])  # ids factorized over their range, or hashed
def test_integer_ids_dense_and_sparse(tmp_path, monkeypatch, spread):
    rng = np.random.default_rng(spread)
    users, items = rng.integers(0, 50, 500) * spread, rng.integers(0, 400, 500) * spread + 3
    path = tmp_path / "ids.csv"
    path.write_text("user,item,time\n" + "".join(
        f"{u},{i},{t}\n" for u, i, t in zip(users, items, rng.integers(0, 99, 500))))  # fmt: skip
    got, want, used = _both(path, monkeypatch)
    assert used and got == want and want["user_ids"][0] == "<i8"
    pq.write_table(pa.table({"user": users, "item": items.astype(np.uint64),
                             "timestamp": rng.integers(0, 99, 500)}), tmp_path / "ids.parquet")  # fmt: skip
    log = load(tmp_path / "ids.parquet", min_events=1).log
    assert log.user_ids.tolist() == np.unique(users).tolist()
    assert log.item_ids.tolist() == np.unique(items).tolist()


@pytest.mark.parametrize(
    ("data", "plain"),
    [
        (b"a,b\n1,2\n", True),
        (b'a,b\n"1,2",3\n', True),
        (b'a,b\n"1\n2",3\n', False),  # a line end inside quotes
        (b'a,b\n"1"x,3\n', False),  # a quote that neither opens nor closes a field
        (b"a,b\n1\r2,3\n", False),  # a lone carriage return
        (b"a,b\n1\x0b,3\n", False),  # a control character
        (b"a,b\n\xe9,3\n", False),  # latin-1
        (b'a,b\n"1,3\n', False),  # a quote left open
    ],
)
def test_plain_file(tmp_path, data, plain):
    path = tmp_path / "f.csv"
    path.write_bytes(data)
    assert _arrow.plain_file(path, ",", True) is plain


def test_errors_name_the_line_through_pyarrow(tmp_path, monkeypatch):
    rows = [f"u{k % 7},{k % 5},{k}\n" for k in range(3000)]
    path = tmp_path / "big.csv"
    bad = rows[:2998] + ["u3,3,29x8\n"] + rows[2999:]
    path.write_text("user,item,time\n\n" + "".join(bad))  # row 2998 on line 3001
    got, want, used = _both(path, monkeypatch)
    message = f"{path}:3001: timestamp '29x8' is not a number (seconds expected)"
    assert used and got == want == ("ValueError", message)
    path.write_text("user,item,time\n" + "".join(rows[:1996] + ["u3,3\n"] + rows[1997:]))
    got, want, _ = _both(path, monkeypatch)
    assert got == want and got[1].startswith(f"{path}:1998: malformed row")


def test_a_bom_past_the_start_reads_as_the_csv_reader(tmp_path, monkeypatch):
    # exports concatenated after a header: the csv reader keeps the second file's BOM in its
    # first field, and so does the loader through pyarrow (which would drop it)
    bom = "\ufeff"
    for name, text in [
        ("ids.csv", f"user,item,timestamp\n{bom}7,10,100\n7,11,101\n"),
        ("ts.csv", f"timestamp,user,item\n{bom}100,a,10\n101,a,11\n"),
        ("crlf.csv", f"{bom}timestamp,user,item\r\n{bom}\r\n3,e,16\r\n"),
        ("b.inter", f"user_id:token\titem_id:token\ttimestamp:float\n{bom}7\t10\t100\n7\t11\t101\n"),
    ]:  # fmt: skip
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        got, want, _ = _both(path, monkeypatch)
        assert got == want, name
    got, want, _ = _both(tmp_path / "ids.csv", monkeypatch)
    assert got["user_ids"][1] == ["7", bom + "7"]


def test_an_unclosed_quote_is_named_with_its_line(tmp_path, monkeypatch):
    # the rest of the file becomes one field, over the csv module's field size limit
    rows = "".join(f"{u % 50},{u % 97},{1_600_000_000 + u}\n" for u in range(8000))
    path = tmp_path / "u.csv"
    path.write_text('user,item,timestamp\n1,"10,100\n' + rows)
    got, want, _ = _both(path, monkeypatch)
    assert got == want
    assert got[0] == "ValueError"
    assert got[1].startswith(
        f"{path}:2: the row starting on this line cannot be read: field larger"
    )


# ---------------------------------------------------------------------------- Parquet
def _write_parquet(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_gives_the_csv_log(tmp_path):
    users, items = ["b", "a", "b", "a", "c"], [30, 10, 10, 20, 30]
    times = [5, 9, 3, 1, 7]
    csv_path = tmp_path / "log.csv"
    csv_path.write_text("user,item,timestamp\n" + "".join(
        f"{u},{i},{t}\n" for u, i, t in zip(users, items, times)))  # fmt: skip
    want = _outcome(csv_path)
    assert _outcome(_write_parquet(tmp_path / "log.parquet", user=users, item=items,
                                   timestamp=times)) == want  # fmt: skip
    # other column names, string ids that are integers, dictionary (categorical) columns
    other = _write_parquet(
        tmp_path / "other.parquet",
        uid=pa.array(users).dictionary_encode(),
        iid=pa.array([str(i) for i in items]),
        ts=pa.array(times, pa.int32()),
    )
    assert _outcome(other, user_col="uid", item_col="iid", time_col="ts") == want
    folder = tmp_path / "only"
    folder.mkdir()
    _write_parquet(folder / "x.parquet", user=users, item=items, timestamp=times)
    assert _outcome(folder) == want


def test_parquet_timestamp_columns_carry_their_unit(tmp_path):
    ms = np.array([1_700_000_000_500, 1_700_000_000_100, 1_700_000_003_000])
    path = _write_parquet(tmp_path / "t.parquet", user=[1, 1, 1], item=[1, 2, 3],
                          timestamp=pa.array(ms, pa.timestamp("ms")))  # fmt: skip
    log = load(path, min_events=1).log
    # ordered by the milliseconds, stored as whole seconds
    assert log.items.tolist() == [2, 1, 3]
    assert log.timestamps.tolist() == [1_700_000_000, 1_700_000_000, 1_700_000_003]
    assert load(path, min_events=1, time_unit="ms").log.items.tolist() == [2, 1, 3]
    with pytest.raises(ValueError, match=r"t.parquet: the timestamp column holds milliseconds "
                                         r"\(its Parquet type says so\); time_unit='s' disagrees"):  # fmt: skip
        load(path, min_events=1, time_unit="s")
    # integer milliseconds in Parquet are caught as in a CSV file
    path = _write_parquet(tmp_path / "i.parquet", user=[1, 1, 1], item=[1, 2, 3], timestamp=ms)
    with pytest.raises(ValueError, match=r"i.parquet: the timestamps look like milliseconds"):
        load(path, min_events=1)


@pytest.mark.parametrize(
    ("columns", "match"),
    [
        (dict(user=[1, None], item=[1, 2], timestamp=[1, 2]),
         r"t.parquet: row 1 \(from 0\): the user id is missing \(null in column 'user'\)"),
        (dict(user=[1.0, 2.0], item=[1, 2], timestamp=[1, 2]),
         r"t.parquet: the user column 'user' holds double; ids must be integers or strings"),
        (dict(user=[1, 2], item=[1, 2], timestamp=[1.0, 2.5]),
         r"t.parquet: row 1 \(from 0\): timestamp '2.5' is not a whole number of seconds"),
        (dict(user=[1, 2], item=["a", ""], timestamp=[1, 2]),
         r"t.parquet: row 1 \(from 0\): empty item id"),
        (dict(user=[1, 2], item=[1, 2], timestamp=["1", "x"]),
         r"t.parquet: row 1 \(from 0\): timestamp 'x' is not a number"),
        (dict(u=[1], item=[1], timestamp=[1]), r"t.parquet: no user column"),
        (dict(user=pa.array([], pa.int64()), item=pa.array([], pa.int64()),
              timestamp=pa.array([], pa.int64())), r"t.parquet: the file holds no data rows"),
        (dict(user=[1, 1], item=[1, 2], timestamp=pa.array([2**63, 5], pa.uint64())),
         r"t.parquet: row 0 \(from 0\): timestamp 9223372036854775808 does not fit int64"),
    ],
)  # fmt: skip
def test_parquet_errors(tmp_path, columns, match):
    path = _write_parquet(tmp_path / "t.parquet", **columns)
    with pytest.raises(ValueError, match=match):
        load(path, min_events=1)


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"bad.parquet: not a Parquet file"):
        load(path)


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    path = _write_parquet(tmp_path / "t.parquet", user=[1], item=[1], timestamp=[1])
    hide_pyarrow(monkeypatch)
    with pytest.raises(ImportError, match=r"Parquet files needs pyarrow: pip install pyarrow"):
        load(path, min_events=1)


def test_the_package_imports_and_reads_csv_without_pyarrow(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item,timestamp\na,1,5\na,2,6\nb,1,7\n")
    script = (
        "import sys\n"
        "for m in ('pyarrow', 'pyarrow.csv', 'pyarrow.compute', 'pyarrow.parquet'):\n"
        "    sys.modules[m] = None\n"
        "import spnn_fast, spnn_fast.data\n"
        f"log = spnn_fast.data.load({str(path)!r}, min_events=1).log\n"
        "print(log.items.tolist(), 'pyarrow' in str(sys.modules.get('pyarrow')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "[1, 2, 1] False"
