"""`.bin` verification sets: fixture agreement, safety against crafted pickles, writing."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from facekd.data.binset import bin_info, decode_bin_images, load_bin, make_bin, write_bin
from facekd.errors import DataError

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
VERIFICATION = FIXTURES / "verification"
VARIANTS = ["tiny_pairs.bin", "tiny_pairs_py2style.bin", "tiny_pairs_ndarray.bin"]


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((VERIFICATION / "expected.json").read_text())


@pytest.mark.parametrize("variant", VARIANTS)
def test_fixture_variants_match_expected(variant: str, expected: dict) -> None:
    bins, issame = load_bin(VERIFICATION / variant)
    images = expected["bin_format"]["images"]
    assert [hashlib.sha256(b).hexdigest() for b in bins] == [i["jpeg_sha256"] for i in images]
    assert issame == expected["bin_format"]["issame_list"]
    stack = decode_bin_images(bins)
    assert stack.shape == (80, 3, 112, 112) and stack.dtype == np.uint8
    assert hashlib.sha256(stack.tobytes()).hexdigest() == expected["load_bin"]["orig_uint8_sha256"]


class _Evil:
    """Pickles to a call of ``fn(*args)`` on load."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize(
    ("payload", "forbidden"),
    [
        (_Evil(__import__("os").system, "touch {marker}"), ".system"),
        (_Evil(eval, "open({marker!r}, 'w').write('x')"), "builtins.eval"),
        (_Evil(exec, "open({marker!r}, 'w').write('x')"), "builtins.exec"),
        (_Evil(__import__("subprocess").call, ["touch", "{marker}"]), "subprocess.call"),
    ],
)
def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path, payload, forbidden) -> None:
    marker = tmp_path / "pwned"
    payload.args = tuple(
        a.format(marker=str(marker)) if isinstance(a, str)
        else [x.format(marker=str(marker)) for x in a]
        for a in payload.args
    )
    bad = tmp_path / "evil.bin"
    for protocol in (0, 2, 4):
        bad.write_bytes(pickle.dumps(([payload, b"x"], [True]), protocol=protocol))
        with pytest.raises(DataError) as err:
            load_bin(bad)
        assert str(bad) in str(err.value) and forbidden in str(err.value)
        assert not marker.exists()


def test_numpy_globals_only_with_uint8(tmp_path: Path) -> None:
    bad = tmp_path / "object_array.bin"
    arr = np.array([b"a", b"b"], dtype=object)
    bad.write_bytes(pickle.dumps(([arr, arr], [True]), protocol=4))
    with pytest.raises(DataError, match="dtype"):
        load_bin(bad)
    # ndarray itself may be named (as _reconstruct's argument) but not called
    calls_ndarray = pickle.dumps(([_Evil(np.ndarray, (3,)), b"x"], [False]), protocol=4)
    bad.write_bytes(calls_ndarray)
    with pytest.raises(DataError, match=r"object_array.bin"):
        load_bin(bad)


def test_numpy_arrays_in_any_protocol(tmp_path: Path) -> None:
    bins, issame = load_bin(VERIFICATION / "tiny_pairs.bin")
    arrays = [np.frombuffer(b, np.uint8).copy() for b in bins]
    arrays[1] = arrays[1].reshape(-1, 1)  # older OpenCV returned (N, 1)
    for protocol in (2, 4):
        path = tmp_path / f"arrays{protocol}.bin"
        path.write_bytes(pickle.dumps((arrays, issame), protocol=protocol))
        assert load_bin(path) == (bins, issame)
    # only uint8 arrays: a bool array needs numpy.dtype('b1'), which is refused
    path.write_bytes(pickle.dumps((arrays, np.array(issame)), protocol=4))
    with pytest.raises(DataError, match="only uint8"):
        load_bin(path)


def test_bad_files(tmp_path: Path) -> None:
    not_pickle = tmp_path / "text.bin"
    not_pickle.write_text("hello, not a pickle\n")
    with pytest.raises(DataError, match=r"text.bin"):
        load_bin(not_pickle)
    truncated = tmp_path / "trunc.bin"
    truncated.write_bytes((VERIFICATION / "tiny_pairs.bin").read_bytes()[:5000])
    with pytest.raises(DataError, match=r"trunc.bin"):
        load_bin(truncated)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True]), protocol=2))
    with pytest.raises(DataError, match="3 images for 1 pairs"):
        load_bin(odd)
    with pytest.raises(DataError, match=r"missing.bin"):
        load_bin(tmp_path / "missing.bin")
    bins, _ = load_bin(VERIFICATION / "tiny_pairs.bin")
    with pytest.raises(DataError, match="image 1 cannot be decoded"):
        decode_bin_images([bins[0], b"not a jpeg"], source="x.bin")


def test_write_then_load_round_trip(tmp_path: Path) -> None:
    bins, issame = load_bin(VERIFICATION / "tiny_pairs_py2style.bin")
    out = tmp_path / "copy.bin"
    write_bin(out, bins, issame)
    assert load_bin(out) == (bins, issame)
    # plain pickle (what insightface does) reads it too
    with open(out, "rb") as f:
        assert pickle.load(f) == (bins, issame)
    with pytest.raises(DataError):
        write_bin(tmp_path / "bad.bin", bins[:3], issame[:1])


def test_make_bin_and_info(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    aligned = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.jpg"), aligned)
    cv2.imwrite(str(tmp_path / "b.png"), aligned[:, :, 0])  # grey: re-encoded as colour JPEG
    cv2.imwrite(str(tmp_path / "big.png"), rng.integers(0, 256, (150, 120, 3), dtype=np.uint8))
    (tmp_path / "pairs.txt").write_text("a.jpg b.png 1\nb.png a.jpg 0\n")
    summary = make_bin(tmp_path / "pairs.txt", tmp_path / "out.bin")
    assert summary["pairs"] == 2 and summary["images"] == 2
    bins, issame = load_bin(tmp_path / "out.bin")
    assert issame == [True, False]
    assert bins[0] == (tmp_path / "a.jpg").read_bytes()  # aligned JPEG kept byte for byte
    assert bins[1][:3] == b"\xff\xd8\xff"
    stack = decode_bin_images(bins)
    assert np.array_equal(stack[1][0], stack[1][2])  # grey image became 3 equal channels
    info = bin_info(tmp_path / "out.bin")
    assert info["pairs"] == 2 and info["genuine"] == 1 and info["formats"] == {"jpeg": 4}
    assert info["image_shapes"] == {"112x112x3": 4}

    (tmp_path / "pairs2.txt").write_text("a.jpg big.png 1\n")
    with pytest.raises(DataError, match=r"big.png"):
        make_bin(tmp_path / "pairs2.txt", tmp_path / "out2.bin")
    make_bin(tmp_path / "pairs2.txt", tmp_path / "out2.bin", resize=True)
    assert decode_bin_images(load_bin(tmp_path / "out2.bin")[0]).shape == (2, 3, 112, 112)
    (tmp_path / "pairs3.txt").write_text("a.jpg missing.jpg 1\n")
    with pytest.raises(DataError, match=r"missing.jpg"):
        make_bin(tmp_path / "pairs3.txt", tmp_path / "out3.bin")
    (tmp_path / "pairs4.txt").write_text("a.jpg b.png yes\n")
    with pytest.raises(DataError, match=r"pairs4.txt:1"):
        make_bin(tmp_path / "pairs4.txt", tmp_path / "out4.bin")


def test_fixture_info_folds() -> None:
    info = bin_info(VERIFICATION / "tiny_pairs_ndarray.bin")
    assert info["pairs"] == 40 and len(info["folds"]) == 10
    assert all(f["pairs"] == 4 for f in info["folds"])
