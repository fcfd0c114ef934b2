"""2-process CPU DDP (gloo) equals one process on the same global batch; resume at 1."""

from __future__ import annotations

import json

import pytest
import torch
from train_support import StandInTeacher, memory_loader_factory, run_ddp, tiny_recipe

from facekd.train.trainer import train

# feature distillation without a connector and a BN-free student: every term is a mean
# over samples, so averaging over ranks gives exactly the global-batch gradient.
COMMON = ("optim.epochs=1", "method.params={connector: none}", "student.head.partial_fc=true",
          "student.head.sample_rate=0.5")


@pytest.mark.slow
def test_two_process_ddp_equals_single_process_and_resumes_at_another_size(tmp_path):
    single = train(tiny_recipe(tmp_path / "single", "feature", (*COMMON, "data.batch_size=8")),
                   loader_factory=memory_loader_factory(), teacher=StandInTeacher())
    run_ddp(2, str(tmp_path / "ddp"), "feature", (*COMMON, "data.batch_size=4"),
            teacher_dim=32)
    a = torch.load(single / "full.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "full.pt", weights_only=True)
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], atol=1e-5,
                                   rtol=1e-4, msg=key)
    # Partial FC: sharded rows merged back into one matrix equal the 1-process head.
    torch.testing.assert_close(a["head"]["weight"], b["head"]["weight"], atol=1e-5,
                               rtol=1e-4)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8
    assert summary["steps"] == 4

    # The 2-process run folder continues in one process (another world size).
    resumed = train(tiny_recipe(tmp_path / "ddp", "feature",
                                (*COMMON, "data.batch_size=8", "optim.epochs=2")),
                    loader_factory=memory_loader_factory(), teacher=StandInTeacher())
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["world_size"] == 1
    assert summary["resumed_from"].endswith("step-00000004.pt")
