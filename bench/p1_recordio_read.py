"""P1: random-access record reads/s, facekd's RecordReader vs MXNet's ``read_idx``.

Same ``.rec`` (insightface layout, ~7.3 KB JPEGs), same random key sequence, page cache
warm, one process each, best of several rounds. MXNet 1.9.1 runs in a side venv
(``bench/_venv_mxnet``, Python 3.11, created on first run) because it does not import
with NumPy 2. Columns:

- ``mxnet read_idx``: raw record bytes only (MXNet's cheapest call);
- ``mxnet read_idx+unpack``: header parsed and payload split, the same work as facekd's
  ``reader[key]``;
- ``plain seek/read``: a straightforward pure-Python reader (dict index, seek + read);
- ``facekd reader[key]`` and ``facekd read_raw``.

Run: ``.venv/bin/python -m bench.p1_recordio_read`` (writes bench/results/p1_recordio.*).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import subprocess
import time
from pathlib import Path

import numpy as np

from bench._prepdata import WORK, ensure_mxnet_venv, load_note, make_rec, write_results
from facekd.data.recordio import open_rec

MXNET_SCRIPT = r"""
import hashlib, json, sys, time
import numpy as np
import mxnet as mx
rec, idx, keys_file, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
keys = np.load(keys_file).tolist()
reader = mx.recordio.MXIndexedRecordIO(idx, rec, 'r')
for k in keys[:2000]:
    reader.read_idx(k)
raw, unpacked = [], []
for _ in range(rounds):
    t = time.perf_counter()
    for k in keys:
        reader.read_idx(k)
    raw.append(time.perf_counter() - t)
    t = time.perf_counter()
    for k in keys:
        mx.recordio.unpack(reader.read_idx(k))
    unpacked.append(time.perf_counter() - t)
digest = hashlib.sha256(b"".join(mx.recordio.unpack(reader.read_idx(k))[1]
                                 for k in keys[:500])).hexdigest()
print(json.dumps({"raw": min(raw), "unpack": min(unpacked), "digest": digest,
                  "mxnet": mx.__version__}))
"""


class PlainReader:
    """The obvious pure-Python reader: dict index, seek + read, struct header."""

    def __init__(self, rec: Path, idx: Path) -> None:
        self.f = open(rec, "rb")  # noqa: SIM115
        self.index = {}
        for line in idx.read_text().splitlines():
            key, offset = line.split("\t")
            self.index[int(key)] = int(offset)

    def read(self, key: int) -> tuple[tuple, bytes]:
        self.f.seek(self.index[key])
        _magic, lrec = struct.unpack("<II", self.f.read(8))
        record = self.f.read(lrec & ((1 << 29) - 1))
        header = struct.unpack("<IfQQ", record[:24])
        start = 24 + 4 * header[0]
        return header, record[start:]


def _best(fn, keys: list[int], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn(keys)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=40000)
    parser.add_argument("--reads", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    folder = make_rec(WORK / f"p1_rec_{args.images}", args.images)
    rec, idx = folder / "train.rec", folder / "train.idx"
    _ = rec.read_bytes()  # page cache warm
    keys = np.random.default_rng(1).integers(1, args.images + 1, args.reads)
    key_list = keys.tolist()
    keys_file = WORK / "p1_keys.npy"
    np.save(keys_file, keys)

    reader = open_rec(folder)
    plain = PlainReader(rec, idx)

    def facekd_get(ks):
        r = reader
        for k in ks:
            r[k]

    def facekd_raw(ks):
        r = reader
        for k in ks:
            r.read_raw(k)

    def plain_get(ks):
        p = plain
        for k in ks:
            p.read(k)

    facekd_get(key_list[:2000])
    plain_get(key_list[:2000])
    ours = _best(facekd_get, key_list, args.rounds)
    ours_raw = _best(facekd_raw, key_list, args.rounds)
    plain_t = _best(plain_get, key_list, args.rounds)
    ours_digest = hashlib.sha256(b"".join(reader[k][1] for k in key_list[:500])).hexdigest()

    python, how = ensure_mxnet_venv()
    mx: dict | None = None
    if python is not None:
        out = subprocess.run([str(python), "-c", MXNET_SCRIPT, str(rec), str(idx),
                              str(keys_file), str(args.rounds)],
                             capture_output=True, text=True, check=True)
        mx = json.loads(out.stdout.strip().splitlines()[-1])
        if mx["digest"] != ours_digest:
            raise SystemExit("MXNet and facekd payloads differ: benchmark invalid")

    n = args.reads
    rows = []
    if mx:
        rows.append({"reader": f"MXNet {mx['mxnet']} read_idx (raw bytes)",
                     "reads/s": n / mx["raw"], "facekd reader[key] speed-up": mx["raw"] / ours})
        rows.append({"reader": f"MXNet {mx['mxnet']} read_idx + unpack",
                     "reads/s": n / mx["unpack"],
                     "facekd reader[key] speed-up": mx["unpack"] / ours})
    rows.append({"reader": "plain Python seek/read + struct",
                 "reads/s": n / plain_t, "facekd reader[key] speed-up": plain_t / ours})
    rows.append({"reader": "facekd read_raw(key)", "reads/s": n / ours_raw,
                 "facekd reader[key] speed-up": ours_raw / ours})
    rows.append({"reader": "facekd reader[key] (header + payload)", "reads/s": n / ours,
                 "facekd reader[key] speed-up": 1.0})
    goal = mx["raw"] / ours if mx else None
    notes = [f"{args.images} images (~7.3 KB JPEG q95), {n} random reads, best of "
             f"{args.rounds} rounds, page cache warm, one process each.",
             "Speed-up = other reader's time / facekd reader[key] time (>1: facekd faster).",
             (f"Goal >= 4x vs MXNet read_idx: measured {goal:.2f}x "
              f"({'met' if goal >= 4 else 'NOT met'})." if mx else
              f"MXNet unavailable ({how}); compared with the plain reader only."),
             "Payload bytes of facekd and MXNet checked identical on the first 500 reads."
             if mx else "",
             load_note(),
             "Command: .venv/bin/python -m bench.p1_recordio_read"]
    md = write_results("p1_recordio", "P1: random-access RecordIO reads", rows,
                       ["reader", "reads/s", "facekd reader[key] speed-up"],
                       [x for x in notes if x],
                       {"args": vars(args), "mxnet": mx, "mxnet_venv": how,
                        "seconds": {"facekd_get": ours, "facekd_raw": ours_raw,
                                    "plain": plain_t}})
    print(md.read_text())


if __name__ == "__main__":
    main()
