"""Checkpoints and embedders: round trips, arcface_torch state dicts, bad and unsafe files."""

from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import pytest
import torch

from facekd.errors import CheckpointError
from facekd.models import create_model, load_backbone, load_embedder, save_checkpoint
from facekd.models.checkpoint import guess_arch, read_checkpoint


def _batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 112, 112, generator=g) * 2 - 1


def _trained_like(arch, **kw):
    """A model whose BN statistics are not the defaults, so a bad load would show."""
    torch.manual_seed(0)
    model = create_model(arch, **kw)
    model.train()
    with torch.no_grad():
        model(_batch(4, 1))
    return model.eval()


def test_facekd_checkpoint_round_trip(tmp_path):
    model = _trained_like("mbf_tiny", num_features=64)
    path = save_checkpoint(tmp_path / "s.pt", model, "mbf_tiny", {"num_features": 64},
                           head={"kind": "arcface", "weight": torch.ones(3, 64)},
                           meta={"step": 7})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "facekd" and raw["version"] == 1 and raw["arch"] == "mbf_tiny"
    loaded, info = load_backbone(path)
    assert info["arch"] == "mbf_tiny" and info["arch_kwargs"] == {"num_features": 64}
    assert info["meta"] == {"step": 7} and info["head"]["kind"] == "arcface"
    assert not loaded.training
    x = _batch()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not list(tmp_path.glob(".*tmp*"))


def test_plain_state_dict_arch_guessed_with_embedding_size(tmp_path):
    model = _trained_like("r_tiny", num_features=96)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # DDP-saved
    torch.save(state, tmp_path / "backbone.pth")
    assert guess_arch(model.state_dict()) == ("r_tiny", {"num_features": 96})
    loaded, info = load_backbone(tmp_path / "backbone.pth")
    assert info["arch"] == "r_tiny" and info["arch_kwargs"] == {"num_features": 96}
    x = _batch()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_arcface_torch_training_checkpoint_nested(tmp_path):
    model = _trained_like("mbf_tiny")
    torch.save({"epoch": 3, "global_step": 10, "state_dict_backbone": model.state_dict(),
                "state_dict_softmax_fc": {"weight": torch.zeros(5, 128)}},
               tmp_path / "checkpoint_gpu_0.pt")
    _, info = load_backbone(tmp_path / "checkpoint_gpu_0.pt", arch="mbf_tiny")
    assert info["arch"] == "mbf_tiny"


def test_mismatch_names_keys_and_suggests_arch(tmp_path):
    torch.save(create_model("mbf_tiny").state_dict(), tmp_path / "m.pth")
    with pytest.raises(CheckpointError) as err:
        load_backbone(tmp_path / "m.pth", arch="r_tiny")
    msg = str(err.value)
    assert "m.pth" in msg and "does not fit 'r_tiny'" in msg
    assert "missing key 'conv1.weight'" in msg
    assert "unexpected key 'layers.0.layers.0.weight'" in msg
    assert "its keys fit 'mbf_tiny'" in msg
    assert "\n" not in msg


def test_unknown_keys_need_arch(tmp_path):
    torch.save({"foo.weight": torch.zeros(2, 2)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="cannot tell the architecture"):
        load_backbone(tmp_path / "x.pth")


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_crafted_pickle_does_not_execute(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Evil(target)}, f)
    torch.save({"x": _Evil(target)}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(CheckpointError, match=r"refused|not a readable"):
            load_backbone(p)
    assert not target.exists()


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"junk\.pt"):
        read_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="no such"):
        read_checkpoint(tmp_path / "absent.pt")


def test_embedder_torch_and_onnx_agree(tmp_path):
    model = _trained_like("mbf_tiny")
    ckpt = save_checkpoint(tmp_path / "s.pt", model, "mbf_tiny")
    onnx_path = tmp_path / "s.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 112, 112),), str(onnx_path),
                          input_names=["input"], output_names=["embedding"],
                          dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    torch_emb = load_embedder(ckpt, device="cpu")
    onnx_emb = load_embedder(onnx_path, device="cpu")
    assert len(torch_emb.sha256) == 64 and torch_emb.sha256 != onnx_emb.sha256
    assert torch_emb.embedding_size == 128 and onnx_emb.embedding_size == 128
    x = _batch(5).numpy()
    a, b = torch_emb(x), onnx_emb(x)
    assert a.dtype == np.float32 and a.shape == (5, 128)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(torch_emb(torch.from_numpy(x)), a)


def test_bad_onnx_file(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match=r"bad\.onnx"):
        load_embedder(tmp_path / "bad.onnx")


class _RawPixelWrapper(torch.nn.Module):
    """An MXNet-style graph: takes 0..255 pixels and normalises inside."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model((x - 127.5) * 0.0078125)


def test_onnx_fixed_batch_and_in_graph_normalisation(tmp_path):
    import onnx

    model = _trained_like("mbf_tiny")
    path = tmp_path / "mx.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_RawPixelWrapper(model).eval(), (torch.zeros(1, 3, 112, 112),),
                          str(path), input_names=["data"], output_names=["fc1"], dynamo=False)
    proto = onnx.load(str(path))
    nodes = list(proto.graph.node)
    first = next(i for i, n in enumerate(nodes) if n.op_type == "Sub") - 1  # its Constant
    head = nodes[first:first + 4]  # Constant, Sub, Constant, Mul: only need the input
    assert [n.op_type for n in head] == ["Constant", "Sub", "Constant", "Mul"]
    for i, node in enumerate(head):  # MXNet-converted graphs start so, with such names
        node.name = f"{node.op_type}{i}"
    del proto.graph.node[:]
    proto.graph.node.extend(head + nodes[:first] + nodes[first + 4:])
    onnx.save(proto, str(path))
    emb = load_embedder(path, device="cpu")
    assert emb.raw_pixels and emb.fixed_batch == 1
    x = _batch(3)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(emb(x.numpy()), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefix", [b"", b"PK\x03\x04", b"\x80\x02", b"\x93NUMPY\x01\x00"])
def test_random_bytes_are_a_checkpoint_error_never_another_exception(tmp_path, prefix):
    """Damaged files make torch's unpickler and numpy's header parser raise anything
    (CI once met IndexError from ``os.urandom`` bytes); each reader must turn every one
    into the one-line CheckpointError. Seeded, so a failure reproduces."""
    import random

    from facekd.models.teacher import load_classifier

    rng = random.Random(1234)
    for i in range(150):
        body = prefix + rng.randbytes(rng.randint(0, 400))
        for suffix, read in ((".pt", read_checkpoint), (".npy", load_classifier)):
            path = tmp_path / f"garbage{i}{suffix}"
            path.write_bytes(body)
            with pytest.raises(CheckpointError, match="garbage"):
                read(path)
