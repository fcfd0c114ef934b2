"""Teachers: arcface_torch run folders with Partial FC shards, facekd checkpoints, ONNX,
hooks, freezing, and `facekd teacher centres` on a tiny RecordIO dataset."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facekd.cli import main
from facekd.errors import CheckpointError, ConfigError
from facekd.models import create_model, load_teacher, save_checkpoint
from facekd.models.heads import create_head
from facekd.models.partial_fc import shard_range
from facekd.models.teacher import merge_partial_fc_shards

C = 7


def _backbone(arch="r_tiny", **kw):
    torch.manual_seed(0)
    model = create_model(arch, **kw)
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 112, 112) * 2 - 1)  # non-default BN statistics
    return model.eval()


def _write_shards(folder, weight, world, ranks=None):
    for rank in ranks if ranks is not None else range(world):
        start, count = shard_range(weight.shape[0], rank, world)
        torch.save({"epoch": 1, "global_step": 5,
                    "state_dict_softmax_fc": {"weight": weight[start:start + count].clone()},
                    "state_optimizer": {"state": {}, "param_groups": []}},
                   folder / f"checkpoint_gpu_{rank}.pt")


def _x(n=2):
    return torch.rand(n, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture
def run_folder(tmp_path):
    model = _backbone()
    weight = torch.randn(C, 256)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    _write_shards(tmp_path, weight, world=2)
    return tmp_path, model, weight


def test_arcface_torch_run_folder_merges_partial_fc(run_folder):
    folder, model, weight = run_folder
    for spec, arch in ((folder, None), (folder / "model.pt", "r_tiny")):  # guessed / given
        teacher = load_teacher(spec, arch=arch, device="cpu")
        torch.testing.assert_close(teacher.centres, F.normalize(weight, dim=1))
        x = _x()
        with torch.no_grad():
            torch.testing.assert_close(teacher.embed(x), model(x))
        logits = teacher.cos_logits(teacher.embed(x), torch.tensor([1, 5]))
        expected = 64.0 * F.normalize(model(x), dim=1) @ F.normalize(weight[[1, 5]], dim=1).T
        torch.testing.assert_close(logits, expected.detach())


def test_shard_errors_missing_rank_and_wrong_rows(tmp_path):
    weight = torch.randn(C, 8)
    _write_shards(tmp_path, weight, world=3, ranks=[0, 2])
    with pytest.raises(CheckpointError, match="rank 1 is missing"):
        merge_partial_fc_shards(tmp_path)
    torch.save({"state_dict_softmax_fc": {"weight": torch.randn(4, 8)}},
               tmp_path / "checkpoint_gpu_1.pt")  # a stray shard: 3 + 4 + 2 rows
    with pytest.raises(CheckpointError, match="rank 1 holds 4 rows; 9 classes over 3 ranks"):
        merge_partial_fc_shards(tmp_path)
    torch.save({"state_dict_softmax_fc": {"weight": weight[3:5]}},
               tmp_path / "checkpoint_gpu_1.pt")
    assert merge_partial_fc_shards(tmp_path).shape == (C, 8)
    with pytest.raises(CheckpointError, match="7 rows in all, expected 9 classes"):
        merge_partial_fc_shards(tmp_path, num_classes=9)
    with pytest.raises(CheckpointError, match="8-d, the teacher embeds 16-d"):
        merge_partial_fc_shards(tmp_path, embedding_size=16)


def test_facekd_checkpoint_head_and_hooks(tmp_path):
    model = _backbone("mbf_tiny")
    head = create_head("arcface", 128, C, scale=32.0)
    path = save_checkpoint(tmp_path / "t.pt", model, "mbf_tiny", head=head)
    teacher = load_teacher(path, device="cpu", feature_layers=["layers.3", "conv_sep"])
    assert teacher.scale == 32.0
    torch.testing.assert_close(teacher.centres, head.centres().detach())
    teacher.embed(_x(3))
    assert teacher.features["layers.3"].shape == (3, 32, 28, 28)
    assert teacher.features["conv_sep"].shape == (3, 128, 7, 7)
    assert not teacher.features["conv_sep"].requires_grad
    with pytest.raises(ConfigError, match="no module named 'layer9'"):
        load_teacher(path, feature_layers=["layer9"])


def test_onnx_teacher_embeddings_only(tmp_path):
    model = _backbone("mbf_tiny")
    onnx_path = tmp_path / "t.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 112, 112),), str(onnx_path),
                          input_names=["input"], output_names=["embedding"],
                          dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    np.save(tmp_path / "centres.npy", np.random.default_rng(0).normal(size=(C, 128)))
    teacher = load_teacher(onnx_path, classifier=tmp_path / "centres.npy", device="cpu")
    x = _x(3)
    with torch.no_grad():
        torch.testing.assert_close(teacher.embed(x), model(x), atol=1e-4, rtol=1e-4)
    assert teacher.cos_logits(teacher.embed(x)).shape == (3, C)
    with pytest.raises(ConfigError, match="embeddings only"):
        load_teacher(onnx_path, feature_layers=["conv_sep"])


def test_teacher_unchanged_by_a_student_training_step(run_folder):
    folder, _, _ = run_folder
    teacher = load_teacher(folder, arch="r_tiny", device="cpu", feature_layers=["layer4"])
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    student = create_model("mbf_tiny")
    connector = torch.nn.Linear(128, 256)
    wrapper = torch.nn.ModuleDict({"student": student, "connector": connector,
                                   "teacher": teacher})
    wrapper.train()  # a careless parent .train() must not wake the teacher's BN
    assert not teacher.training and not teacher.model.training
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    x = _x(4)
    t_emb = teacher.embed(x)
    s_emb = connector(student(x))
    loss = F.mse_loss(s_emb, t_emb) + F.kl_div(
        F.log_softmax(teacher.cos_logits(s_emb), 1), F.softmax(teacher.cos_logits(t_emb), 1),
        reduction="batchmean")
    loss.backward()
    opt.step()
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(p.grad is not None for p in student.parameters())


def _tiny_rec_dataset(folder, per_class=2, classes=3):
    from facekd.data.recordio import write_insightface_dataset

    rng = np.random.default_rng(0)
    samples = []
    for label in range(classes):
        base = rng.integers(0, 255, size=(112, 112, 3))
        for _ in range(per_class):
            img = np.clip(base + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)
            samples.append((label, cv2.imencode(".jpg", img)[1].tobytes()))
    write_insightface_dataset(folder, samples, num_classes=classes)
    return samples


def _expected_centres(model, samples, classes):
    sums = torch.zeros(classes, model.num_features, dtype=torch.float64)
    images = [cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
              for _, jpeg in samples]
    x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    with torch.no_grad():
        feats = F.normalize(model(x) + model(x.flip(3)), dim=1).double()
    for (label, _), f in zip(samples, feats, strict=True):
        sums[label] += f
    return F.normalize(sums.float(), dim=1)


def test_teacher_centres_cli_and_resume(tmp_path):
    model = _backbone("mbf_tiny", num_features=32)
    save_checkpoint(tmp_path / "t.pt", model, "mbf_tiny", {"num_features": 32})
    samples = _tiny_rec_dataset(tmp_path / "data")
    expected = _expected_centres(model, samples, 3)

    assert main(["teacher", "centres", str(tmp_path / "t.pt"), str(tmp_path / "data"),
                 str(tmp_path / "c.npy"), "--batch-size", "2", "--device", "cpu"]) == 0
    got = torch.from_numpy(np.load(tmp_path / "c.npy"))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # interrupted after 2 of 3 batches, then resumed: same centres, partial file removed
    from facekd.data.loader import build_train_loader
    from facekd.models.teacher import teacher_centres

    class Boom(RuntimeError):
        pass

    def dying_loader(*args, **kwargs):
        loader = build_train_loader(*args, **kwargs)

        class Dying:
            num_classes = loader.num_classes
            state_dict, load_state_dict = loader.state_dict, loader.load_state_dict

            def __len__(self):
                return len(loader)

            def __iter__(self):
                for i, batch in enumerate(loader):
                    if i == 2:
                        raise Boom
                    yield batch
        return Dying()

    out = tmp_path / "c.pt"
    with pytest.raises(Boom):
        teacher_centres(tmp_path / "t.pt", tmp_path / "data", out, batch_size=2,
                        save_every=1, device="cpu", progress=False,
                        loader_factory=dying_loader)
    assert (tmp_path / "c.pt.partial.pt").exists() and not out.exists()
    teacher_centres(tmp_path / "t.pt", tmp_path / "data", out, batch_size=2, device="cpu",
                    progress=False)
    saved = torch.load(out, weights_only=True)
    torch.testing.assert_close(saved["centres"], expected, atol=1e-5, rtol=1e-5)
    # killed and resumed = uninterrupted, to the bit (one pass order, float64 sums)
    assert torch.equal(saved["centres"], got)
    assert saved["counts"].tolist() == [2, 2, 2]
    assert not (tmp_path / "c.pt.partial.pt").exists()
    assert "resuming teacher centres" in (tmp_path / "c.pt.log").read_text()
    teacher = load_teacher(tmp_path / "t.pt", classifier=out, device="cpu")
    torch.testing.assert_close(teacher.centres, saved["centres"])


def test_missing_teacher_is_one_line_error(tmp_path, capsys):
    assert main(["teacher", "centres", str(tmp_path / "nope.pt"), str(tmp_path),
                 str(tmp_path / "o.npy")]) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_partial_fc_v1_tensor_shards(tmp_path):
    weight = torch.randn(5, 8)
    for rank in range(2):
        start, count = shard_range(5, rank, 2)
        torch.save(weight[start:start + count].clone(),
                   tmp_path / f"rank_{rank}_softmax_weight.pt")
        torch.save(torch.zeros(count, 8), tmp_path / f"rank_{rank}_softmax_weight_mom.pt")
    torch.testing.assert_close(merge_partial_fc_shards(tmp_path), F.normalize(weight, dim=1))
