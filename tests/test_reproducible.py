"""Same recipe and seed on one machine -> bitwise the same checkpoints, whatever the
process's thread pool was (the host's core count must not leak into the weights)."""

from __future__ import annotations

import json

import pytest
import torch

from facekd.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from facekd.data.synth import generate

    root = tmp_path_factory.mktemp("repro")
    generate(root / "data", preset="tiny", identities=4, images_per_id=8, lfw_pairs=0,
             cfp_pairs=0, agedb_pairs=0, ijb_identities=0, unlabelled_identities=0,
             progress=False)
    (root / "recipe.yaml").write_text(
        "data: {batch_size: 8, num_workers: 2}\n"
        "student: {arch: mbf_tiny, embedding_size: 16, head: {scale: 16}}\n"
        "method: {name: none}\n"
        "optim: {epochs: 1, lr: 0.1}\n"
        "run: {device: cpu, progress: false, tensorboard: false, threads: 1, save_every: 2}\n")
    return root


def _train(root, name: str, process_threads: int) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(process_threads)  # what a host with more cores starts with
    try:
        code = main(["distill", str(root / "recipe.yaml"), f"run.output={root / name}",
                     f"data.train={root / 'data'}", "data.val_bins=[]"])
        assert code == 0
        assert torch.get_num_threads() == process_threads  # restored after the run
    finally:
        torch.set_num_threads(before)
    out = root / name
    return {"full": torch.load(out / "full.pt", weights_only=True),
            "state": torch.load(sorted((out / "checkpoints").glob("step-*.pt"))[-1],
                                weights_only=True),
            "summary": json.loads((out / "summary.json").read_text())}


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def test_two_runs_give_bitwise_equal_checkpoints_whatever_the_thread_pool(data):
    a = _train(data, "a", process_threads=1)
    b = _train(data, "b", process_threads=2)
    assert a["summary"]["threads"] == b["summary"]["threads"] == 1
    assert a["summary"]["deterministic"] is True
    assert a["summary"]["steps"] == b["summary"]["steps"] == 4
    for what in ("full", "state"):
        ta, tb = dict(_tensors(a[what])), dict(_tensors(b[what]))
        assert ta.keys() == tb.keys() and len(ta) > 10
        differing = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not differing, f"{what}: {differing[:5]}"


def test_negative_thread_count_is_refused_in_one_line(data, capsys):
    code = main(["distill", str(data / "recipe.yaml"), "run.threads=-1",
                 f"run.output={data / 'bad'}", f"data.train={data / 'data'}"])
    assert code == 2
    assert "run.threads" in capsys.readouterr().err
