"""facekd.data: bytes and images (RecordIO, shards, .bin sets, alignment, training input).

Only light names are re-exported; heavy modules (cv2, torch, pandas) load on first use.
"""

from facekd.data.recordio import IRHeader, RecordReader, RecordWriter, open_rec, pack_record

__all__ = ["IRHeader", "RecordReader", "RecordWriter", "open_rec", "pack_record"]
