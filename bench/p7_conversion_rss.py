"""P7: peak RSS of the conversions is flat in dataset size.

Runs ``rec2shards`` (2 workers), ``shards2rec`` and ``rec2folder``-free ``reindex`` on
synthetic datasets of growing size, each in a fresh subprocess, and records that
process's peak RSS (``ru_maxrss``) and the largest peak among its worker processes.
Memory that grows with the data would show as a slope; the index arrays (16 bytes per
record) are the only per-record state and stay far below the fixed costs here.

Run: ``.venv/bin/python -m bench.p7_conversion_rss`` (writes bench/results/p7_rss.*).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

from bench._prepdata import WORK, load_note, make_rec, write_results

CHILD = r"""
import json, resource, sys
from facekd.data.recordio import reindex
from facekd.data.shards import rec2shards, shards2rec
job, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
if job == "rec2shards":
    rec2shards(src, out, shard_size=2000, workers=2)
elif job == "shards2rec":
    shards2rec(src, out, progress=False)
else:
    reindex(src, out)
print(json.dumps({"self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def run(job: str, src: str, out: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, job, src, out], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000, 40000])
    args = parser.parse_args()

    rows = []
    for n in args.sizes:
        folder = make_rec(WORK / f"p1_rec_{n}", n)
        rec_mb = (folder / "train.rec").stat().st_size / 1e6
        shards = WORK / f"p7_shards_{n}"
        back = WORK / f"p7_back_{n}"
        shutil.rmtree(shards, ignore_errors=True)
        shutil.rmtree(back, ignore_errors=True)
        a = run("rec2shards", str(folder), str(shards))
        b = run("shards2rec", str(shards), str(back))
        c = run("reindex", str(folder / "train.rec"), str(WORK / f"p7_{n}.idx"))
        rows.append({"images": n, "train.rec MB": rec_mb,
                     "rec2shards main MB": a["self_mb"], "rec2shards worker MB": a["workers_mb"],
                     "shards2rec MB": b["self_mb"], "reindex MB": c["self_mb"]})
        shutil.rmtree(shards, ignore_errors=True)
        shutil.rmtree(back, ignore_errors=True)
        (WORK / f"p7_{n}.idx").unlink(missing_ok=True)
    first, last = rows[0], rows[-1]
    growth = {k: last[k] / first[k] for k in first if k.endswith(" MB") and k != "train.rec MB"}
    data_growth = last["train.rec MB"] / first["train.rec MB"]
    worst = max(growth, key=growth.get)
    notes = [f"Peak RSS (ru_maxrss) per job, each in a fresh process; data grows "
             f"{data_growth:.1f}x from first to last row.",
             "Growth of peak RSS over the same range: " +
             ", ".join(f"{k[:-3]} {v:.2f}x" for k, v in growth.items()) +
             f" (worst: {worst[:-3]}).",
             "Flat means the growth stays near 1x while the data grows; the reader's index "
             "(16 bytes per record) is the only per-record state.",
             load_note(),
             "Command: .venv/bin/python -m bench.p7_conversion_rss"]
    md = write_results("p7_rss", "P7: peak RSS of conversions vs dataset size", rows,
                       list(rows[0]), notes, {"args": vars(args), "growth": growth})
    print(md.read_text())


if __name__ == "__main__":
    main()
