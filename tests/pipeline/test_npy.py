"""pipeline.npy: rows of an [N, D] .npy read as copies, the file never left mapped in the process."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import CurateError
from pipeline.npy import NpyRows, load_checked


def mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


@pytest.fixture
def npy(tmp_path) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((1000, 7)).astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    return tmp_path / "x.npy", x


def test_rows_slices_and_positions_are_copies_of_the_file(npy):
    path, x = npy
    r = NpyRows(path)
    assert r.shape == (1000, 7) and len(r) == 1000 and r.dtype == np.float16 and r.ndim == 2
    assert np.array_equal(r[10:20], x[10:20]) and np.array_equal(r[[5, 3, 999]], x[[5, 3, 999]])
    sub = NpyRows(path, np.arange(0, 1000, 3))
    assert sub.shape == (334, 7) and np.array_equal(sub[2:4], x[[6, 9]])
    assert np.array_equal(sub.take([1, 5])[0:2], x[[3, 15]])
    assert np.array_equal(np.concatenate([b for _, b in sub.blocks(100)]), x[::3])
    got = r[0:5]
    got[:] = 0  # a copy: the file is untouched
    assert np.array_equal(np.load(path), x)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_reads_leave_no_mapping_behind(npy):
    path, _ = npy
    r = NpyRows(path)
    kept = [r[s:s + 100] for s in range(0, 1000, 100)] + [r[[1, 2]]]
    assert len(kept) == 11 and not mapped(path)  # a memmap would keep the pages it touched resident here
    mm = np.load(path, mmap_mode="r")
    assert mapped(path)  # the check itself can tell
    del mm


def test_load_checked_is_float32_and_names_the_bad_row(npy, tmp_path):
    path, x = npy
    out = load_checked(path, "embed/x.npy")
    assert out.dtype == np.float32 and np.array_equal(out, x.astype(np.float32))
    rows = np.array([2, 40, 700])
    assert np.array_equal(load_checked(path, "embed/x.npy", rows), x[rows].astype(np.float32))
    y = x.copy()
    y[700, 3] = np.inf
    np.save(tmp_path / "y.npy", y)
    with pytest.raises(CurateError, match=r"^embed/y.npy row 700 is NaN or infinite$"):
        load_checked(tmp_path / "y.npy", "embed/y.npy", rows)
    with pytest.raises(CurateError, match=r"^embed/y.npy row 700 is NaN or infinite$"):
        load_checked(tmp_path / "y.npy", "embed/y.npy")


def test_not_a_matrix_or_not_an_npy(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros(5))
    with pytest.raises(CurateError, match="must be \\[N, D\\]"):
        NpyRows(tmp_path / "v.npy")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(CurateError, match="cannot read"):
        NpyRows(tmp_path / "bad.npy")
    np.save(tmp_path / "obj.npy", np.array([[{"a": 1}]], dtype=object), allow_pickle=True)
    with pytest.raises(CurateError, match="cannot read"):  # never unpickled
        NpyRows(tmp_path / "obj.npy")
