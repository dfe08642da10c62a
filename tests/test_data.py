"""Data loading tests. None touches the network: the ml-100k download runs a stand-in command."""

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

import spnn_fast.download as download
from spnn_fast.data import Dataset, DatasetUnavailableError, load, multi_hot

INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
1\t10\t3\t100
1\t20\t4\t101
1\t30\t5\t99
1\t10\t2\t102
1\t40\t1\t103
2\t20\t3\t200
2\t50\t3\t201.0
2\t10\t3\t202
3\t60\t4\t300
3\t20\t4\t301
4\t30\t1\t400
4\t70\t1\t401
4\t20\t1\t402
"""
ITEM = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
10\tToy Story\t1995\tAnimation Comedy
20\tHeat\t1995\tAction Crime Thriller
30\tNix\t1994\t
40\tFour\t1995\tComedy
60\tGone\t1990\tDrama
99\tExtra\t2000\tDrama
"""
USER = """user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token
1\t24\tM\ttechnician\t85711
2\t53\tF\tother\t94043
4\t17\tM\t\t11111
3\t30\tF\twriter\t00001
"""
# Remapped: items 10->1 20->2 30->3 40->4 50->5 70->6 (60 only for the dropped user 3);
# users 1->0 2->1 4->2.
GENRE = [[0, 0, 0], [2, 3, 0], [1, 4, 5], [0, 0, 0], [3, 0, 0], [0, 0, 0], [0, 0, 0]]
GENRE_LABELS = ["", "Action", "Animation", "Comedy", "Crime", "Thriller"]


@pytest.fixture(autouse=True, params=["pyarrow", "csv-reader"])
def reader(request, monkeypatch):
    """Every test runs with pyarrow reading the files and with the csv reader alone (pyarrow
    hidden, as on a machine without it): both give the same logs and the same errors."""
    if request.param == "pyarrow":
        pytest.importorskip("pyarrow")
    else:
        for name in ("pyarrow", "pyarrow.compute", "pyarrow.csv", "pyarrow.parquet"):
            monkeypatch.setitem(sys.modules, name, None)
    return request.param


def _write(folder: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(text.encode(encoding))
    return path


def _atomic(folder: Path, stem: str = "mini") -> Path:
    _write(folder, f"{stem}.item", ITEM)
    _write(folder, f"{stem}.user", USER)
    return _write(folder, f"{stem}.inter", INTER)


def _check_mini_log(ds: Dataset) -> None:
    log = ds.log
    log.validate()
    np.testing.assert_array_equal(log.offsets, [0, 5, 8, 11])
    np.testing.assert_array_equal(log.items, [3, 1, 2, 1, 4, 2, 5, 1, 3, 6, 2])
    np.testing.assert_array_equal(
        log.timestamps, [99, 100, 101, 102, 103, 200, 201, 202, 400, 401, 402]
    )
    assert log.timestamps.dtype == np.int64
    np.testing.assert_array_equal(log.user_ids, [1, 2, 4])
    np.testing.assert_array_equal(log.item_ids, [10, 20, 30, 40, 50, 70])
    assert ds.dropped_users == 1


def _check_mini_named_features(ds: Dataset, genre: str = "genre") -> None:
    np.testing.assert_array_equal(ds.item_features[genre], GENRE)
    assert ds.item_features[genre].dtype == np.int64
    assert ds.feature_labels[genre] == GENRE_LABELS
    np.testing.assert_array_equal(ds.user_features["age"], [2, 6, 1])
    np.testing.assert_array_equal(ds.user_features["gender"], [2, 1, 2])
    np.testing.assert_array_equal(ds.user_features["occupation"], [2, 1, 0])
    assert ds.feature_labels["occupation"] == ["", "other", "technician"]
    assert ds.feature_vocab == {genre: 6, "age": 8, "gender": 3, "occupation": 3}


def test_atomic_by_path(tmp_path, caplog):
    inter = _atomic(tmp_path)
    with caplog.at_level(logging.WARNING, logger="spnn_fast"):
        ds = load(inter)
    assert "dropped 1 of 4 users with fewer than 3 events" in caplog.text
    assert ds.name == "mini"
    _check_mini_log(ds)
    # by default every token / token_seq field of the side files is encoded
    assert list(ds.item_features) == ["movie_title", "release_year", "class"]
    assert list(ds.user_features) == ["age", "gender", "occupation", "zip_code"]
    _check_mini_named_features(
        load(tmp_path, item_fields={"class": "genre"}, user_fields=["age", "gender", "occupation"])
    )
    assert ds.feature_labels["release_year"] == ["", "1994", "1995"]
    np.testing.assert_array_equal(ds.item_features["release_year"], [0, 2, 2, 1, 2, 0, 0])
    np.testing.assert_array_equal(ds.user_features["zip_code"], [2, 3, 1])
    assert ds.feature_labels["zip_code"] == ["", "11111", "85711", "94043"]
    renamed = load(inter, item_fields="class", user_fields={"age": "user_age"})
    assert list(renamed.item_features) == ["class"]
    np.testing.assert_array_equal(renamed.user_features["user_age"], [2, 6, 1])
    assert renamed.feature_vocab == {"class": 6, "user_age": 8}


def test_min_events(tmp_path):
    inter = _atomic(tmp_path)
    ds = load(inter, min_events=1, item_fields=(), user_fields=())
    assert ds.dropped_users == 0 and ds.log.num_users == 4 and ds.log.num_items == 7
    assert ds.item_features == {} and ds.feature_vocab == {}
    ds = load(inter, min_events=5)
    assert ds.dropped_users == 3 and ds.log.num_items == 4
    with pytest.raises(ValueError, match="no user has at least min_events=6"):
        load(inter, min_events=6)
    with pytest.raises(ValueError, match="min_events must be >= 1"):
        load(inter, min_events=0)
    with pytest.raises(TypeError, match="min_events"):
        load(inter, min_events="3")


def _fake_pip(src: Path, exit_code: int = 0, write_wheel: bool = True):
    """A stand-in for `pip download` that zips ``src``'s files into a wheel in the target dir."""
    script = (
        "import sys, zipfile, pathlib\n"
        "dest, src = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
        f"if {write_wheel!r}:\n"
        "    with zipfile.ZipFile(dest / 'recbole-1.2.1-py3-none-any.whl', 'w') as z:\n"
        "        for f in ('ml-100k.inter', 'ml-100k.item', 'ml-100k.user'):\n"
        "            z.write(src / f, 'recbole/dataset_example/ml-100k/' + f)\n"
        "sys.stderr.write('stand-in pip says no')\n"
        f"sys.exit({exit_code})\n"
    )
    return lambda dest: [sys.executable, "-c", script, dest, str(src)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("SPNN_FAST_CACHE", str(folder))
    monkeypatch.setattr(download, "_ML100K_COUNTS", (13, 4, 7))
    return folder


def test_ml100k_download_then_cache(tmp_path, cache, monkeypatch):
    src = tmp_path / "src"
    _atomic(src, "ml-100k")
    monkeypatch.setattr(download, "_pip_download_command", _fake_pip(src))
    ds = load("ml-100k")
    assert ds.name == "ml-100k"
    _check_mini_log(ds)
    _check_mini_named_features(ds)
    for f in ("ml-100k.inter", "ml-100k.item", "ml-100k.user"):
        assert (cache / "ml-100k" / f).read_bytes() == (src / f).read_bytes()
    assert sorted(p.name for p in (cache / "ml-100k").iterdir()) == sorted(
        ["ml-100k.inter", "ml-100k.item", "ml-100k.user"]
    )

    # Cached: a failing downloader is never called, even with download=False.
    monkeypatch.setattr(download, "_pip_download_command", _fake_pip(src, exit_code=1))
    _check_mini_log(load("ml-100k", download=False))


def test_ml100k_download_failure(tmp_path, cache, monkeypatch):
    src = tmp_path / "src"
    _atomic(src, "ml-100k")
    monkeypatch.setattr(download, "_pip_download_command", _fake_pip(src, 3, write_wheel=False))
    with pytest.raises(DatasetUnavailableError) as err:
        load("ml-100k")
    msg = str(err.value)
    assert "exited with status 3" in msg and "stand-in pip says no" in msg
    assert f"`{sys.executable} -c" in msg  # the command that failed
    assert str(cache / "ml-100k") in msg and "ml-100k.inter, ml-100k.item, ml-100k.user" in msg
    assert "load('/path/to/ml-100k')" in msg and "SPNN_FAST_CACHE" in msg
    assert not (cache / "ml-100k" / "ml-100k.inter").exists()

    monkeypatch.setattr(download, "_pip_download_command", _fake_pip(src, 0, write_wheel=False))
    with pytest.raises(DatasetUnavailableError, match="left no recbole wheel"):
        load("ml-100k")
    with pytest.raises(DatasetUnavailableError, match="download=False.*place ml-100k.inter"):
        load("ml-100k", download=False)


def test_ml100k_wrong_counts(tmp_path, cache, monkeypatch):
    src = tmp_path / "src"
    _atomic(src, "ml-100k")
    monkeypatch.setattr(download, "_pip_download_command", _fake_pip(src))
    monkeypatch.setattr(download, "_ML100K_COUNTS", (100000, 943, 1682))
    with pytest.raises(ValueError, match=r"\(13, 4, 7\), expected \(100000, 943, 1682\)"):
        load("ml-100k")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SPNN_FAST_CACHE", str(tmp_path / "x"))
    assert download.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SPNN_FAST_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert download.cache_dir() == tmp_path / ".cache" / "spnn_fast"


def test_ml1m(tmp_path):
    folder = tmp_path / "ml-1m"
    _write(
        folder,
        "ratings.dat",
        "1::1193::5::978300760\n1::661::3::978302109\n1::914::3::978301968\n"
        "2::1193::4::978298413\n2::661::4::978299000\n2::3408::4::978298500\n",
    )
    _write(
        folder,
        "movies.dat",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "914::Caf\u00e9 (1964)::Musical|Romance\n3408::Erin Brockovich (2000)::Drama\n",
        encoding="latin-1",
    )
    _write(folder, "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    for source in (folder, folder / "ratings.dat"):
        ds = load(source)
        assert ds.name == "ml-1m"
        np.testing.assert_array_equal(ds.log.item_ids, [661, 914, 1193, 3408])
        np.testing.assert_array_equal(ds.log.items, [3, 2, 1, 3, 4, 1])
        np.testing.assert_array_equal(
            ds.item_features["genre"], [[0] * 3, [1, 2, 4], [4, 5, 0], [3, 0, 0], [3, 0, 0]]
        )
        assert ds.feature_labels["genre"] == [
            "",
            "Animation",
            "Children's",
            "Drama",
            "Musical",
            "Romance",
        ]
        np.testing.assert_array_equal(ds.user_features["age"], [1, 7])
        np.testing.assert_array_equal(ds.user_features["gender"], [1, 2])
        np.testing.assert_array_equal(ds.user_features["occupation"], [1, 2])
        assert ds.feature_labels["occupation"] == ["", "10", "16"]
        assert ds.feature_vocab == {"genre": 6, "gender": 3, "age": 8, "occupation": 3}
    assert list(load(folder, user_fields=["zip_code"]).user_features) == ["zip_code"]


def test_csv(tmp_path):
    rows = "a,x,1,10\na,y,1,11\na,z,1,12\nb,y,2,5\nb,x,2,6\nb,x,2,7\n"
    ds = load(_write(tmp_path, "log.csv", "user_id,item_id,rating,timestamp\n" + rows))
    assert ds.name == "log" and ds.item_features == {} and ds.user_features == {}
    np.testing.assert_array_equal(ds.log.user_ids, ["a", "b"])
    np.testing.assert_array_equal(ds.log.item_ids, ["x", "y", "z"])
    np.testing.assert_array_equal(ds.log.items, [1, 2, 3, 2, 1, 1])
    np.testing.assert_array_equal(ds.log.timestamps, [10, 11, 12, 5, 6, 7])
    other = load(
        _write(
            tmp_path,
            "b.csv",
            "Time, Item, User, r\n"
            + "\n".join(
                f"{t}, {i}, {u}, {r}" for u, i, r, t in (line.split(",") for line in rows.split())
            )
            + "\n\n",
        )
    )
    np.testing.assert_array_equal(other.log.items, ds.log.items)
    tsv = load(
        _write(
            tmp_path,
            "c.tsv",
            "uid\tiid\tts\n" + rows.replace(",1,", "\t").replace(",2,", "\t").replace(",", "\t"),
        ),
        user_col="uid",
        item_col="IID",
        time_col="ts",
    )
    np.testing.assert_array_equal(tsv.log.items, ds.log.items)
    quoted = load(_write(tmp_path, "d.csv", 'user,item,time\n"u, 1",7,1\n"u, 1",8,2\n"u, 1",7,3\n'))
    np.testing.assert_array_equal(quoted.log.user_ids, ["u, 1"])
    np.testing.assert_array_equal(quoted.log.item_ids, [7, 8])
    semi = load(
        _write(tmp_path, "e.txt", "user;item;timestamp\n1;2;3\n1;2;4\n1;5;5\n"), delimiter=";"
    )
    np.testing.assert_array_equal(semi.log.items, [1, 1, 2])


def test_ids_and_timestamps(tmp_path):
    text = "user,item,timestamp\n007,1,881250949.0\n7,1,1700000000123\n007,2,-5\n7,2,1\n007,3,1e3\n7,3,2\n"
    ds = load(_write(tmp_path, "t.csv", text), time_unit="s")  # 1700000000123 s, as asked
    # "007" and "7" are different ids, so the user ids stay strings
    np.testing.assert_array_equal(ds.log.user_ids, ["007", "7"])
    np.testing.assert_array_equal(ds.log.timestamps, [-5, 1000, 881250949, 1, 2, 1700000000123])
    np.testing.assert_array_equal(ds.log.item_ids, [1, 2, 3])
    assert ds.log.item_ids.dtype == np.int64
    # int() reads "\u0663" as 3: digits of other scripts keep the ids strings, not one id
    text = "user,item,timestamp\n1,3,1\n1,\u0663,2\n1,3,3\n"
    np.testing.assert_array_equal(
        load(_write(tmp_path, "d.csv", text)).log.item_ids, ["3", "\u0663"]
    )


@pytest.mark.parametrize(
    "value,message",
    [
        ("1.5", "not a whole number"),
        ("nan", "not a number"),
        ("-inf", "not a number"),
        ("1e300", "not a whole number"),
        ("abc", "not a number"),
        ("1_000", "not a number"),  # Python's int() and float() read these
        ("\u0661\u0660\u0661", "not a number"),
        ("", "not a number"),
    ],
)
def test_bad_timestamps(tmp_path, value, message):
    text = INTER.replace("\t101\n", f"\t{value}\n")
    path = _write(tmp_path, "bad.inter", text)
    with pytest.raises(ValueError, match=f"bad.inter:3: timestamp '{value}' is {message}"):
        load(path)


def test_millisecond_timestamps_are_refused_or_converted(tmp_path):
    rows = "".join(f"{u},{i},{t}\n" for u, i, t in [(1, 5, 1_700_000_000_900), (1, 6, 1_700_000_000_100),
                                                   (1, 7, 1_700_000_002_000), (2, 5, 1_600_000_000_000)])  # fmt: skip
    path = _write(tmp_path, "ms.csv", "user,item,timestamp\n" + rows)
    with pytest.raises(ValueError, match=r"ms.csv: the timestamps look like milliseconds since "
                                         r"1970, not seconds \(the largest magnitude is "
                                         r"1700000002000; .*pass load\(\.\.\., time_unit='ms'\) "
                                         r"to convert them, or time_unit='s'"):  # fmt: skip
        load(path, min_events=1)
    ds = load(path, min_events=1, time_unit="ms")
    np.testing.assert_array_equal(ds.log.items, [2, 1, 3, 1])  # in millisecond order
    np.testing.assert_array_equal(ds.log.timestamps, [1_700_000_000, 1_700_000_000, 1_700_000_002,
                                                      1_600_000_000])  # fmt: skip
    with pytest.raises(ValueError, match=r"time_unit='sec' is not one of"):
        load(path, time_unit="sec")


def test_timestamps_may_carry_spaces(tmp_path):
    text = INTER.replace("\t101\n", "\t 101 \n").replace("\t201.0\n", "\t201.0 \n")
    np.testing.assert_array_equal(load(_write(tmp_path, "s.inter", text)).log.timestamps,
                                  load(_atomic(tmp_path / "a")).log.timestamps)  # fmt: skip


def test_malformed_and_empty(tmp_path):
    lines = INTER.splitlines()
    lines[4] = "1\t10\t3"
    with pytest.raises(ValueError, match=r"m.inter:5: malformed row: expected 4 fields.*got 3"):
        load(_write(tmp_path, "m.inter", "\n".join(lines) + "\n"))
    with pytest.raises(ValueError, match=r"r.dat:2: malformed row: expected 4 fields"):
        load(_write(tmp_path, "r.dat", "1::2::3::4\n1::2::3\n"))
    with pytest.raises(ValueError, match=r"c.csv:3: malformed row"):
        load(_write(tmp_path, "c.csv", "user,item,time\n1,2,3\n1,2\n"))
    with pytest.raises(ValueError, match=r"q.csv:3: malformed row"):
        load(_write(tmp_path, "q.csv", 'user,item,time\n"1",2,3\n"1",2\n'))
    with pytest.raises(ValueError, match=r"e.inter: the file is empty"):
        load(_write(tmp_path, "e.inter", ""))
    with pytest.raises(ValueError, match=r"e.csv: the file is empty"):
        load(_write(tmp_path, "e.csv", "\n"))
    with pytest.raises(ValueError, match=r"h.inter: the file holds no data rows"):
        load(_write(tmp_path, "h.inter", INTER.splitlines()[0] + "\n\n"))
    with pytest.raises(ValueError, match=r"x.inter:1: header field 'user_id' is not"):
        load(_write(tmp_path, "x.inter", "user_id\titem_id:token\n1\t2\n"))
    with pytest.raises(ValueError, match=r"i.csv:2: empty user id"):
        load(_write(tmp_path, "i.csv", "user,item,time\n,2,3\n"))


def test_a_side_file_listing_an_id_twice_is_an_error(tmp_path):
    # The later row used to replace the earlier one silently.
    _write(tmp_path, "mini.user", USER)
    _write(tmp_path, "mini.item", ITEM.replace("40\tFour\t1995\tComedy", "20\tFour\t1995\tComedy"))
    inter = _write(tmp_path, "mini.inter", INTER)
    with pytest.raises(ValueError, match=r"mini.item:5: item id '20' is listed again \(first on "
                                         r"line 3\); each item takes one row"):  # fmt: skip
        load(inter)
    folder = tmp_path / "ml-1m"
    _write(folder, "ratings.dat", "1::10::5::1\n1::11::5::2\n2::10::5::3\n")
    _write(folder, "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n\n1::M::1::10::1\n")
    with pytest.raises(ValueError, match=r"users.dat:4: user id '1' is listed again \(first on "
                                         r"line 1\)"):  # fmt: skip
        load(folder, min_events=1)


def test_names_paths_and_fields(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown dataset name 'ml-10m'; known names: \['ml-100k'\]"
    ):
        load("ml-10m")
    with pytest.raises(FileNotFoundError, match="nope.csv does not exist"):
        load(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load(_write(tmp_path, "data.json", "{}"))
    with pytest.raises(ValueError, match="format='json' is not one of"):
        load(tmp_path / "data.json", format="json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="found no single data file"):
        load(empty)
    with pytest.raises(ValueError, match=r"no user column \(one of \['user', 'user_id'\]\)"):
        load(_write(tmp_path, "n.csv", "u,item,time\n1,2,3\n"))
    inter = _atomic(tmp_path / "a")
    with pytest.raises(
        ValueError, match=r"mini.item: no item field 'genre'; its feature fields are"
    ):
        load(inter, item_fields=["genre"])
    with pytest.raises(ValueError, match=r"share the names \['x'\]"):
        load(inter, item_fields={"class": "x"}, user_fields={"gender": "x"})
    csv_path = _write(tmp_path, "f.csv", "user,item,time\n1,2,3\n")
    with pytest.raises(ValueError, match="requested but there is no item file"):
        load(csv_path, min_events=1, item_fields=["genre"])
    with pytest.raises(TypeError, match="user_col must be a str or None, got int"):
        load(csv_path, user_col=0)
    with pytest.raises(ValueError, match="columns must differ, got user='item', item='item'"):
        load(csv_path, user_col="item")
    with pytest.raises(ValueError, match="no timestamp column"):
        load(_write(tmp_path, "nt.inter", "user_id:token\titem_id:token\n1\t2\n"))


def test_multi_hot():
    codes = np.array([[0, 0, 0], [2, 3, 0], [1, 4, 5]])
    out = multi_hot(codes, 6)
    assert out.dtype == np.float32 and out.shape == (3, 5)
    np.testing.assert_array_equal(out, [[0] * 5, [0, 1, 1, 0, 0], [1, 0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"\[0, 5\), got \[0, 5\]"):
        multi_hot(codes, 6 - 1)
