"""CUDA-path defects proven on CPU with stand-ins and spies (no GPU in CI).

Each test here failed before its fix: a resume that loaded RNG state onto the GPU, the
teacher cache's per-step centre copy, unpinned batches, per-step host syncs, CUDA RNG of
every visible GPU, DDP buffers of different length when a grad is None, and a traceback
for ``--device cuda`` on a machine without one.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_support import (
    GradReduceModel,
    StandInTeacher,
    grad_reduce_worker,
    memory_loader_factory,
    run_processes,
    tiny_recipe,
)

from facekd.errors import FacekdError
from facekd.train import checkpointing
from facekd.train.trainer import Trainer, train

FAKE_GPU = torch.device("cuda:0")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
RECORDIO = SHARED / "recordio"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- resume on a GPU
def test_resume_reads_the_checkpoint_to_the_host_whatever_the_device(tmp_path, monkeypatch):
    """map_location is "cpu" and torch.set_rng_state gets a CPU ByteTensor, even when the
    run trains on a GPU (here a trainer whose device says cuda:0)."""
    factory = memory_loader_factory()
    train(tiny_recipe(tmp_path, "none", ("optim.epochs=1", "run.max_steps=2")),
          loader_factory=factory)
    trainer = Trainer(tiny_recipe(tmp_path, "none", ("optim.epochs=1",)),
                      loader_factory=factory)
    try:
        trainer.setup()
        trainer.device = FAKE_GPU          # what setup() picks on a CUDA machine
        seen: dict[str, object] = {}
        real_load = checkpointing.load_state

        real_torch_load = torch.load

        def spy_torch_load(*args, **kwargs):
            seen["map_location"] = kwargs.get("map_location")
            kwargs["map_location"] = "cpu"  # no GPU here to map onto
            return real_torch_load(*args, **kwargs)

        def spy_load(*args, **kwargs):
            with monkeypatch.context() as m:
                m.setattr(torch, "load", spy_torch_load)
                return real_load(*args, **kwargs)

        set_states: list[torch.Tensor] = []
        real_set = torch.set_rng_state
        monkeypatch.setattr(checkpointing, "load_state", spy_load)
        monkeypatch.setattr(torch, "set_rng_state",
                            lambda t: (set_states.append(t), real_set(t))[1])
        step, _, _ = trainer.try_resume()
    finally:
        trainer.close()
    assert step == 2
    assert str(seen["map_location"]) == "cpu"
    assert set_states and all(t.device.type == "cpu" and t.dtype == torch.uint8
                              for t in set_states)


def test_rng_state_of_the_training_gpu_only(monkeypatch):
    """capture/restore touch the run's GPU generator, never every visible GPU's."""
    calls: list[tuple[str, object]] = []
    saved = torch.arange(16, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)

    def refuse(*a, **k):
        raise AssertionError("opened a CUDA context on every GPU")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device="cuda": (calls.append(("get", device)), saved)[1])
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": calls.append(("set", device, state)))
    state = checkpointing.capture_rng(torch.device("cuda:3"))
    assert calls == [("get", 3)] and torch.equal(state["cuda"], saved)
    checkpointing.restore_rng(state, torch.device("cuda:3"))
    kind, index, restored = calls[-1]
    assert kind == "set" and index == 3
    assert restored.device.type == "cpu" and restored.dtype == torch.uint8
    # an older checkpoint holding every GPU's state: only this GPU's entry is used
    old = dict(state, cuda=[saved + i for i in range(8)])
    checkpointing.restore_rng(old, torch.device("cuda:5"))
    assert calls[-1][1] == 5 and torch.equal(calls[-1][2], saved + 5)
    # a CPU run saves and restores no CUDA state at all
    calls.clear()
    assert "cuda" not in checkpointing.capture_rng(torch.device("cpu"))
    checkpointing.restore_rng(state, torch.device("cpu"))
    assert calls == []


# ---------------------------------------------------------------- teacher cache
def test_cache_centres_reach_the_device_once_not_per_step(tmp_path, monkeypatch):
    from facekd.train.cache import build_teacher_cache

    factory = memory_loader_factory()
    build_teacher_cache("", "memory", tmp_path / "cache", batch_size=8, dtype="float32",
                        teacher=StandInTeacher(), progress=False, loader_factory=factory)
    recipe = tiny_recipe(tmp_path / "run", "srd", ("optim.epochs=1",
                                                   f"teacher.cache={tmp_path / 'cache'}"))
    trainer = Trainer(recipe, loader_factory=factory)
    try:
        trainer.setup()
        centres = trainer.cache.centres
        moves = []
        real_to = torch.Tensor.to

        def spy_to(self, *args, **kwargs):
            if self is centres:
                moves.append(args or kwargs)
            return real_to(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", spy_to)
        result = trainer.fit()
    finally:
        trainer.close()
    assert result["step"] == 4
    assert moves == []  # before: one copy of the whole C x D matrix per step
    assert trainer.cache.centres_on("cpu") is trainer.cache.centres_on("cpu")


# ---------------------------------------------------------------- pinned batches
def test_trainer_asks_for_pinned_batches_on_cuda(tmp_path):
    from facekd.train.ddp import DistInfo

    received: list[dict] = []
    base = memory_loader_factory()

    def factory(source, batch_size, **kw):
        received.append(dict(kw))
        kw.pop("pin_memory", None)
        return base(source, batch_size, **kw)

    trainer = Trainer(tiny_recipe(tmp_path, "none"), loader_factory=factory)
    trainer.dist, trainer.device = DistInfo(), FAKE_GPU
    trainer._build_data()
    assert received and received[0].get("pin_memory") is True
    trainer.device = torch.device("cpu")
    received.clear()
    trainer._build_data()
    assert "pin_memory" not in received[0]   # CPU: stand-ins without the option still work


def test_worker_loader_is_pinned_persistent_and_prefetching(tmp_path, monkeypatch):
    """The options reach torch's DataLoader, and one worker pool serves every epoch with
    the batches a fresh in-process loader gives (set_epoch reaches persistent workers)."""
    import torch.utils.data as tud

    from facekd.data.loader import build_train_loader

    source = RECORDIO / "insightface_layout"   # 60 images, read straight from the .rec
    made: list[dict] = []
    real = tud.DataLoader

    class SpyLoader(real):
        def __init__(self, *args, **kwargs):
            made.append(dict(kwargs))
            kwargs["pin_memory"] = False  # no CUDA here to pin for
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tud, "DataLoader", SpyLoader)
    loader = build_train_loader(source, 4, seed=3, num_workers=2, pin_memory=True)
    passes = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        passes.append([b["key"].tolist() for b in loader])
    assert len(made) == 1  # built once, kept
    assert made[0]["pin_memory"] is True and made[0]["persistent_workers"] is True
    assert made[0]["prefetch_factor"] >= 2
    for epoch, got in zip((0, 1, 0), passes, strict=True):
        plain = build_train_loader(source, 4, seed=3, epoch=epoch, num_workers=0)
        assert got == [b["key"].tolist() for b in plain]
    assert passes[0] != passes[1]


# ---------------------------------------------------------------- syncs per step
class _OnDeviceTeacher(StandInTeacher):
    """The stand-in teacher without its host copy: embeddings stay where the input is."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x.float())


_SYNCS = ("item", "__float__", "__bool__", "__int__", "tolist", "numpy", "cpu")


def test_no_host_sync_inside_a_training_step(tmp_path, monkeypatch):
    """With a fused optimiser (the CUDA default) a step reads nothing back to the host;
    loss values are read by the loop on logging steps only."""
    recipe = tiny_recipe(tmp_path, "feature", ("optim.epochs=1", "optim.fused=true",
                                               "run.log_every=100"))
    trainer = Trainer(recipe, loader_factory=memory_loader_factory(),
                      teacher=_OnDeviceTeacher())
    counts: list[int] = []
    real_step = Trainer.train_step

    def counted_step(self, batch, unlabelled):
        calls = []
        saved = {name: getattr(torch.Tensor, name) for name in _SYNCS}

        def wrap(name):
            def spy(t, *a, **k):
                calls.append(name)
                return saved[name](t, *a, **k)
            return spy

        for name in _SYNCS:
            monkeypatch.setattr(torch.Tensor, name, wrap(name))
        try:
            return real_step(self, batch, unlabelled)
        finally:
            for name, fn in saved.items():
                monkeypatch.setattr(torch.Tensor, name, fn)
            counts.append(len(calls))

    monkeypatch.setattr(Trainer, "train_step", counted_step)
    try:
        trainer.setup()
        trainer.fit()
    finally:
        trainer.close()
    assert counts == [0, 0, 0, 0]
    rows = _rows(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["4"]   # the final step still logs
    assert float(rows[0]["loss/loss"]) > 0


class _NanAt:
    """A loader wrapper whose batch number ``bad`` carries a NaN pixel."""

    def __init__(self, inner, bad: int) -> None:
        self.inner, self.bad = inner, bad

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i == self.bad:
                batch = dict(batch, image=batch["image"].clone())
                batch["image"][0, 0, 0, 0] = float("nan")
            yield batch


@pytest.mark.parametrize("fused", ["true", "false"])
def test_non_finite_loss_skips_the_step_and_is_counted(tmp_path, fused):
    base = memory_loader_factory()

    def factory(source, batch_size, **kw):
        return _NanAt(base(source, batch_size, **kw), bad=1)

    out = train(tiny_recipe(tmp_path, "none", ("optim.epochs=1", f"optim.fused={fused}")),
                loader_factory=factory)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1
    rows = _rows(out / "metrics.csv")
    assert [int(r["skipped_steps"]) for r in rows] == [0, 1, 1, 1]
    state = torch.load(out / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())
    momentum = torch.load(sorted((out / "checkpoints").glob("*.pt"))[-1],
                          weights_only=True)["optimizer"]["state"]
    assert all(torch.isfinite(s["momentum_buffer"]).all() for s in momentum.values())


def test_fused_skip_of_a_first_step_leaves_no_garbage():
    """torch's fused SGD leaves an uninitialised momentum buffer when its first step is
    skipped; prepare_fused zeroes it, with the same updates as the plain optimiser."""
    from facekd.train.amp import prepare_fused, step_unless

    def run(fused: bool, skip_first: bool) -> torch.Tensor:
        p = torch.nn.Parameter(torch.ones(5))
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1,
                              **({"fused": True} if fused else {}))
        prepare_fused(opt)
        for i in range(3):
            p.grad = torch.full((5,), float(i + 1))
            step_unless(opt, torch.tensor(1.0 if skip_first and i == 0 else 0.0))
        return p.detach()

    torch.testing.assert_close(run(True, False), run(False, False))
    torch.testing.assert_close(run(True, True), run(False, True))
    assert torch.isfinite(run(True, True)).all()


# ---------------------------------------------------------------- DDP
def test_all_reduce_with_a_grad_none_on_one_rank_matches_one_process(tmp_path):
    out = tmp_path / "grads.pt"
    run_processes(grad_reduce_worker, 2, str(out), timeout=120)
    ddp = torch.load(out, weights_only=True)
    model = GradReduceModel()
    x, flags = GradReduceModel.batch()
    model(x, flags).backward()
    for name, p in model.named_parameters():
        if p.grad is None:
            assert ddp[name] is None, name       # untouched everywhere: still no grad
        else:
            torch.testing.assert_close(ddp[name], p.grad, msg=name)
    assert ddp["never_used.weight"] is None and ddp["used_by_rank0.weight"] is not None


# ---------------------------------------------------------------- --device cuda
@pytest.mark.parametrize("choice", ["cuda", "cuda:1", "CUDA:0"])
def test_cuda_asked_for_without_cuda_is_one_clear_error(choice, monkeypatch):
    from facekd.devices import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FacekdError, match="CUDA is not available"):
        pick_device(choice)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device(None) == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")


def test_pick_device_accepts_auto_cuda_and_index(monkeypatch):
    from facekd.devices import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto", local_rank=3) == torch.device("cuda:1")
    assert pick_device("cuda", local_rank=1) == torch.device("cuda:1")
    assert pick_device("cuda:0", local_rank=1) == torch.device("cuda:0")
    with pytest.raises(FacekdError, match="GPU 2 but this machine has 2"):
        pick_device("cuda:2")
    with pytest.raises(FacekdError, match="expected auto, cpu, cuda or cuda:N"):
        pick_device("gpu")


def test_cli_device_cuda_without_cuda_exits_2_in_one_line(tmp_path, capsys, monkeypatch):
    from facekd.cli import main
    from facekd.models import create_model
    from facekd.models.checkpoint import save_checkpoint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ckpt = save_checkpoint(tmp_path / "m.pt", create_model("mbf_tiny"), "mbf_tiny", {})
    bin_path = str(SHARED / "verification" / "tiny_pairs.bin")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"run: {{output: {tmp_path / 'run'}, device: cuda}}\n"
                      f"data: {{train: {tmp_path}}}\n")
    commands = [
        ["eval", "verify", str(ckpt), bin_path, "--device", "cuda", "--no-progress"],
        ["teacher", "centres", str(ckpt), str(tmp_path / "none"), str(tmp_path / "c.npy"),
         "--device", "cuda"],
        ["distill", str(recipe)],
    ]
    for argv in commands:
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert len(err.splitlines()) == 1 and "CUDA is not available" in err, (argv, err)
        assert "Traceback" not in err


def test_loaded_embedder_and_teacher_use_the_one_picker():
    import facekd.devices
    import facekd.models.embedder
    import facekd.train.ddp

    assert facekd.models.embedder.pick_device is facekd.devices.pick_device
    assert facekd.train.ddp.pick_device is facekd.devices.pick_device


# ---------------------------------------------------------------- AMP, channels_last, compile
def test_amp_choice_per_device():
    from facekd.errors import ConfigError
    from facekd.train.amp import resolve_amp

    cpu = torch.device("cpu")
    for choice, name, dtype, scaler in [(True, "fp16", torch.float16, True),
                                        ("fp16", "fp16", torch.float16, True),
                                        ("bf16", "bf16", torch.bfloat16, False),
                                        (False, "none", None, False),
                                        ("none", "none", None, False)]:
        mode = resolve_amp(choice, FAKE_GPU, bf16_supported=True)
        assert (mode.name, mode.dtype, mode.scaler) == (name, dtype, scaler), choice
    assert resolve_amp(True, cpu).name == "none"      # fp16 is a CUDA thing
    assert resolve_amp("bf16", cpu).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="bf16 needs a GPU with bfloat16 support"):
        resolve_amp("bf16", FAKE_GPU, bf16_supported=False)


def test_bf16_channels_last_run_on_cpu(tmp_path, monkeypatch):
    """run.amp=bf16 autocasts the step (no scaler), channels_last reaches the student."""
    from facekd.models.registry import create_model as real_create

    layouts: list[bool] = []
    dtypes: list[torch.dtype] = []

    def create(name, **kw):
        model = real_create(name, **kw)
        model.stage1.register_forward_pre_hook(  # training batches (not the shape probe)
            lambda m, a: layouts.append(a[0].is_contiguous(memory_format=torch.channels_last))
            if a[0].shape[0] == 8 else None)
        model.fc.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
        return model

    monkeypatch.setattr("facekd.models.create_model", create)
    out = train(tiny_recipe(tmp_path, "none", ("optim.epochs=1", "run.amp=bf16",
                                               "run.channels_last=true")),
                loader_factory=memory_loader_factory())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["amp"] == "bf16" and summary["steps"] == 4
    assert layouts == [True] * 4 and torch.bfloat16 in dtypes
    assert all(np.isfinite(v) for v in summary["last_losses"].values())


def test_compile_key_trains_through_the_compiled_student(tmp_path, monkeypatch):
    """run.compile hands the student to torch.compile, trains through what it returns and
    saves the plain student's weights (stand-in compiler: the real one is a GPU check)."""
    compiled: list[torch.nn.Module] = []
    calls = []

    def fake_compile(module, **kw):
        compiled.append(module)

        def forward(*a, **k):
            calls.append(1)
            return module(*a, **k)
        return forward

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = train(tiny_recipe(tmp_path, "none", ("optim.epochs=1", "run.compile=true")),
                loader_factory=memory_loader_factory())
    assert len(compiled) == 1 and len(calls) == 4
    state = torch.load(out / "student.pt", weights_only=True)["state_dict"]
    assert set(state) == set(compiled[0].state_dict())


# ---------------------------------------------------------------- device JPEG decoding
def _mixed_dataset(folder: Path) -> Path:
    """JPEGs, a PNG and a JPEG of another size: what device decoding must hand back."""
    import cv2

    from facekd.data.recordio import write_insightface_dataset

    rng = np.random.default_rng(0)
    samples = []
    for i in range(20):
        side = 120 if i == 7 else 112
        small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        image = cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC)
        ext, params = (".png", []) if i == 3 else (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90])
        samples.append((i // 5, cv2.imencode(ext, image, params)[1].tobytes()))
    write_insightface_dataset(folder, samples, num_classes=4)
    return folder


@pytest.mark.parametrize("workers", [0, 2])
def test_device_decoding_gives_the_cpu_path_pixels(tmp_path, workers):
    """torchvision's decode_jpeg (here on CPU: the device path's code) against the cv2
    path: measured max difference 0 on CPU, so the batches must be equal, flips too."""
    from facekd.data.loader import build_train_loader

    source = _mixed_dataset(tmp_path / "mixed")
    plain = list(build_train_loader(source, 8, seed=5, drop_last=False))
    device = list(build_train_loader(source, 8, seed=5, drop_last=False, num_workers=workers,
                                     decode_device="cpu"))
    assert len(plain) == len(device) == 3
    for a, b in zip(plain, device, strict=True):
        assert set(b) == set(a)
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert any(b["flipped"].any() for b in plain)


def test_trainer_hands_its_device_to_the_decoder(tmp_path):
    from facekd.train.ddp import DistInfo

    received: list[dict] = []
    base = memory_loader_factory()

    def factory(source, batch_size, **kw):
        received.append(dict(kw))
        kw.pop("decode_device", None)
        return base(source, batch_size, **kw)

    trainer = Trainer(tiny_recipe(tmp_path, "none", ("data.decode=device",)),
                      loader_factory=factory)
    trainer.dist, trainer.device = DistInfo(), torch.device("cpu")
    trainer._build_data()
    assert received[0]["decode_device"] == torch.device("cpu")


def test_cache_build_copies_embeddings_to_the_host_per_chunk_not_per_batch(tmp_path,
                                                                            monkeypatch):
    """Each .cpu() of a device embedding is a sync: one per written chunk, not per batch."""
    from facekd.train.cache import build_teacher_cache, open_cache

    dim = 32
    copies = []
    real_cpu = torch.Tensor.cpu

    def spy_cpu(self, *a, **k):
        if self.ndim == 3 and self.shape[1:] == (2, dim):  # (image, mirror) embedding pairs
            copies.append(tuple(self.shape))
        return real_cpu(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "cpu", spy_cpu)
    build_teacher_cache("", "memory", tmp_path / "c", batch_size=4, dtype="float16",
                        teacher=_OnDeviceTeacher(dim=dim), progress=False, chunk_batches=3,
                        loader_factory=memory_loader_factory())
    monkeypatch.undo()
    assert copies == [(12, 2, dim)] * 2 + [(8, 2, dim)]   # 8 batches -> 3 + 3 + 2
    cache = open_cache(tmp_path / "c")
    batch = next(iter(memory_loader_factory()("memory", 8, seed=0, flip=False)))
    want = _OnDeviceTeacher(dim=dim).embed(batch["image"]).half().float()
    torch.testing.assert_close(cache.lookup(batch["key"], batch["flipped"]).embedding, want)
