"""Partial FC: 2 processes (gloo, CPU) give the single-process loss and gradients."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from facekd.errors import CheckpointError
from facekd.models.heads import create_head, head_from_state
from facekd.models.partial_fc import PartialFC, shard_range

C, D, B = 7, 16, 6  # 7 classes over 2 ranks: uneven shards (4 + 3)


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(C, D, generator=g)
    emb = torch.randn(B, D, generator=g)
    labels = torch.tensor([0, 6, 3, -1, 4, 0])  # one unlabelled row
    return weight, emb, labels


def _run(pfc: PartialFC, weight, emb, labels, steps: int = 2):
    """Loss and gradients of ``steps`` forward passes (sampling changes per step)."""
    pfc.load_export_state({"weight": weight})
    pfc.train()
    out = []
    for _ in range(steps):
        emb_req = emb.clone().requires_grad_(True)
        pfc.zero_grad()
        loss = pfc(emb_req, labels)
        loss.backward()
        out.append((loss.detach(), emb_req.grad.clone(), pfc.weight.grad.clone()))
    return out


SAMPLE_RATES = (1.0, 0.5)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        weight, emb, labels = _problem()
        per = B // world
        mine = slice(rank * per, (rank + 1) * per)
        for rate in SAMPLE_RATES:
            pfc = PartialFC(D, C, kind="arcface", margin=0.5, sample_rate=rate, seed=3)
            results = _run(pfc, weight, emb[mine], labels[mine])
            full = pfc.export_state()
            main = pfc.export_state(main_only=True)  # streamed to rank 0 alone
            torch.save({"results": results, "export": full, "start": pfc.class_start,
                        "main_only": main},
                       os.path.join(out_dir, f"rate{rate}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """Run both sample rates in one 2-process gloo job (spawning costs most of the time)."""
    out = tmp_path_factory.mktemp("pfc")
    mp.start_processes(_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    return {rate: [torch.load(out / f"rate{rate}_rank{r}.pt", weights_only=True)
                   for r in range(2)] for rate in SAMPLE_RATES}


@pytest.mark.parametrize("sample_rate", SAMPLE_RATES)
def test_two_processes_equal_one(two_rank_results, sample_rate):
    weight, emb, labels = _problem()
    single = _run(PartialFC(D, C, kind="arcface", margin=0.5, sample_rate=sample_rate,
                            seed=3), weight, emb, labels)
    ranks = two_rank_results[sample_rate]
    for step, (loss, emb_grad, w_grad) in enumerate(single):
        parts = [r["results"][step] for r in ranks]
        for part in parts:
            torch.testing.assert_close(part[0], loss, atol=1e-6, rtol=1e-6)
        # each rank's embedding gradient is world_size x its share (DDP then averages)
        torch.testing.assert_close(torch.cat([p[1] for p in parts]) / 2, emb_grad,
                                   atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(torch.cat([p[2] for p in parts]), w_grad,
                                   atol=1e-6, rtol=1e-5)
    for r in ranks:  # merged export is the full matrix at any world size
        torch.testing.assert_close(r["export"]["weight"], weight)
    assert ranks[1]["main_only"] is None
    assert torch.equal(ranks[0]["main_only"]["weight"], ranks[0]["export"]["weight"])
    assert [r["start"] for r in ranks] == [0, 4]


def test_single_process_equals_plain_cross_entropy():
    weight, emb, labels = _problem()
    pfc = PartialFC(D, C, kind="arcface", margin=0.5)
    pfc.load_export_state({"weight": weight})
    head = create_head("arcface", D, C, margin=0.5)
    with torch.no_grad():
        head.weight.copy_(weight)
    keep = labels >= 0
    expected = F.cross_entropy(head(emb[keep], labels[keep]), labels[keep])
    torch.testing.assert_close(pfc(emb, labels), expected)


def test_sampling_keeps_positives_and_roughly_the_rate():
    pfc = PartialFC(D, 1000, sample_rate=0.1, seed=1)
    labels = torch.tensor([5, 17, 999, 500])
    counts = []
    for _ in range(5):
        index = pfc.sample_local(labels)
        assert set(labels.tolist()) <= set(index.tolist())
        assert torch.all(index[1:] > index[:-1])
        counts.append(index.numel())
        pfc.step += 1
    assert 50 < sum(counts) / len(counts) < 150
    pfc.eval()
    assert pfc.sample_local(labels) is None


def test_resharding_round_trip_any_world_size():
    weight = torch.randn(10, D)
    rows = []
    for rank in range(3):  # resume a 2-GPU run's merged matrix on 3 ranks
        part = PartialFC(D, 10, rank=rank, world_size=3)
        part.load_export_state({"weight": weight, "step": 12})
        assert part.step == 12
        rows.append(part.weight.detach())
    assert [r.shape[0] for r in rows] == [4, 3, 3]
    torch.testing.assert_close(torch.cat(rows), weight)
    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
    single = PartialFC(D, 10, kind="cosface", margin=0.4)
    single.load_export_state({"weight": weight})
    head = head_from_state(single.export_state())  # a teacher can use it as one matrix
    assert head.m3 == pytest.approx(0.4) and torch.equal(head.weight.detach(), weight)


def test_wrong_classifier_shape_is_a_checkpoint_error():
    pfc = PartialFC(D, 10)
    with pytest.raises(CheckpointError, match=r"needs \[10, 16\]"):
        pfc.load_export_state({"weight": torch.zeros(9, D)}, source="ck.pt")
