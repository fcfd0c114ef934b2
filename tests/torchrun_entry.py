"""What the multi-node tests launch with ``torchrun``: facekd's own CLI, with the BN-free
test student (``train_test_nobn``) registered first.

BatchNorm statistics are per rank on CPU (no SyncBatchNorm without CUDA), so only a
BN-free student can train *exactly* like one process; everything else — torchrun's c10d
rendezvous, the environment the trainer reads, the real loader over a real ``.rec``, the
teacher cache and the checkpoints — is what users run.
"""

from __future__ import annotations

import sys

from train_support import register_test_models

from facekd.cli import main

if __name__ == "__main__":
    register_test_models()
    sys.exit(main(sys.argv[1:]))
