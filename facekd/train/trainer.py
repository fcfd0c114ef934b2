"""The training loop: student (+ margin head) + distillation method + teacher (live or cached).

``train(recipe)`` composes the stages: the loader (``facekd.data``), the backbone, heads
and teachers (``facekd.models``) and one loss module (``facekd.distill``). It owns what
the stages must not: devices, DDP, AMP, the optimiser and schedule, checkpoints that
resume after a kill (also at another world size), logs and the run folder::

    OUT/recipe.yaml  train.log  metrics.csv  tb/  checkpoints/step-*.pt
        student.pt (backbone only, facekd checkpoint)  full.pt (+ head, method)  summary.json
"""

from __future__ import annotations

import csv
import logging
import math
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from facekd.errors import ConfigError
from facekd.models.embedder import TorchEmbedder
from facekd.train import checkpointing as ckpt
from facekd.train.ddp import (
    DistInfo,
    all_reduce_grads,
    barrier,
    gather_objects,
    init_distributed,
    launched_world_size,
    mean_scalar,
)
from facekd.train.recipe import Recipe
from facekd.train.schedule import StepSchedule

log = logging.getLogger(__name__)

# (embedder, .bin path, batch size) -> verification numbers with "acc_mean"
Evaluator = Callable[[Any, str, int], dict[str, Any]]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class MetricsLog:
    """metrics.csv (columns grow as new loss names appear) + optional TensorBoard scalars."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as f:
                self.rows = list(csv.DictReader(f))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                log.warning("tensorboard is not installed; scalars go to metrics.csv only")

    def drop_after(self, step: int) -> None:
        """Forget rows logged after ``step`` (a resumed run repeats those steps)."""
        self.rows = [r for r in self.rows if int(float(r.get("step", 0))) <= step]

    def add(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **values}
        self.rows.append(row)
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        from facekd.fileio import atomic_path

        columns: list[str] = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


class _Cycle:
    """Endless iteration over a secondary (unlabelled) loader, advancing its own epoch."""

    def __init__(self, loader: Any, epoch: int = 0, mid_epoch: bool = False) -> None:
        self.loader = loader
        self.epoch = epoch
        self._iter: Iterator[dict[str, Any]] | None = None
        if not mid_epoch:
            loader.set_epoch(epoch)

    def __next__(self) -> dict[str, Any]:
        for attempt in range(2):
            if self._iter is None:
                self._iter = iter(self.loader)
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
                if attempt:
                    break
                self.epoch += 1
                self.loader.set_epoch(self.epoch)
        raise ConfigError("data.unlabelled: the unlabelled source yields no batch "
                          "(fewer samples than one batch?)")


class _LoopReport:
    """What the training loop reports: the progress bar, a log line and a metrics row
    every ``run.log_every`` steps (and the last; images/s over the steps since the
    previous one), a warning when non-finite steps were skipped, evaluation rows."""

    def __init__(self, trainer: Trainer, step: int, stop_at: int, global_batch: int) -> None:
        from tqdm import tqdm

        r = trainer.recipe
        self.trainer, self.stop_at, self.global_batch = trainer, stop_at, global_batch
        self.log_every = r.run.log_every
        self.metrics = MetricsLog(trainer.out, r.run.tensorboard) if trainer.dist.is_main \
            else None
        if self.metrics is not None:  # the checkpoint's own step numbering (it may be
            self.metrics.drop_after(trainer.resume_saved_step)   # re-indexed on resume)
        self.bar = tqdm(total=stop_at, initial=step, unit="step", dynamic_ncols=True,
                        desc="distill", disable=not (r.run.progress and trainer.dist.is_main))
        self.skipped_logged = int(trainer.skipped_steps.item())
        self.window_start, self.window_steps = time.perf_counter(), 0

    def step(self, step: int, epoch: int, values: dict[str, Any]) -> None:
        """Count step ``step`` (losses ``values``); log it when it is a logging step."""
        self.window_steps += 1
        if step % self.log_every == 0 or step == self.stop_at:
            self._log(step, epoch, values)
        self.bar.update(1)

    def _log(self, step: int, epoch: int, values: dict[str, Any]) -> None:
        t = self.trainer
        elapsed = time.perf_counter() - self.window_start
        ips = self.window_steps * self.global_batch / max(elapsed, 1e-9)
        logged = {f"loss/{k}": mean_scalar(float(v), t.dist, t.device)
                  for k, v in values.items() if k != "grad_norm"}
        logged.update({"lr": t.schedule.get_last_lr()[0], "epoch": epoch,
                       "images_per_s": ips,
                       "grad_norm": float(values["grad_norm"]),
                       "skipped_steps": int(t.skipped_steps.item())})
        if t.scaler.is_enabled():  # fp16's "scale stuck at 0" shows here
            logged["amp_scale"] = float(t.scaler.get_scale())
        if logged["skipped_steps"] > self.skipped_logged:
            log.warning("step %d: %d step(s) skipped so far for a non-finite "
                        "loss or gradient", step, logged["skipped_steps"])
            self.skipped_logged = logged["skipped_steps"]
        if self.metrics is not None:
            self.metrics.add(step, logged)
            log.info("step %d/%d epoch %d loss %.4f lr %.5f %.1f img/s", step,
                     t.total_steps, epoch, logged["loss/loss"], logged["lr"], ips)
        self.bar.set_postfix(loss=f"{logged['loss/loss']:.3f}", img_s=f"{ips:.0f}")
        self.window_start, self.window_steps = time.perf_counter(), 0

    def evaluate(self, step: int) -> dict[str, float]:
        """The trainer's verification at ``step``, its results added to the metrics."""
        results = self.trainer.evaluate(step)
        if self.metrics is not None and results:
            self.metrics.add(step, results)
        return results

    def flush(self) -> None:
        if self.metrics is not None:
            self.metrics.flush()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


class Trainer:
    """One training run; ``Trainer(recipe).run()`` returns the run folder.

    ``loader_factory`` replaces :func:`facekd.data.loader.build_train_loader` (same
    signature) for data facekd cannot read; ``teacher`` is an already loaded teacher
    (``embed``/``centres``/``scale``/``features``) used instead of ``teacher.checkpoint``.
    ``evaluator(embedder, bin_path, batch_size) -> {"acc_mean": ...}`` scores
    ``data.val_bins`` during training; it is passed in (``facekd distill`` gives
    :func:`facekd.evaluate.evaluate_bin`) because training comes before evaluation in the
    pipeline and must not import it.
    """

    def __init__(self, recipe: Recipe, *, loader_factory: Callable[..., Any] | None = None,
                 teacher: Any = None, evaluator: Evaluator | None = None) -> None:
        self.recipe = recipe
        self.loader_factory = loader_factory
        self.given_teacher = teacher
        self.evaluator = evaluator
        self.out = Path(recipe.run.output)
        self.dist = DistInfo()
        self.device = torch.device("cpu")
        self._log_handler: logging.Handler | None = None
        self.hooks: Any = None

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        r = self.recipe
        self.dist, self.device = init_distributed(r.run.device)
        if self.dist.is_main:
            from facekd.config import save_config
            from facekd.logs import add_file_log

            self.out.mkdir(parents=True, exist_ok=True)
            save_config(r, self.out / "recipe.yaml")
            self._log_handler = add_file_log(self.out / "train.log")
        # The run's log file wants INFO even when the caller left logging unconfigured.
        package_log = logging.getLogger("facekd")
        self._saved_level = package_log.level
        if not self.dist.is_main:
            package_log.setLevel(logging.WARNING)   # one voice on the console: rank 0
        elif package_log.getEffectiveLevel() > logging.INFO:
            package_log.setLevel(logging.INFO)
        barrier(self.dist)
        self.seed = r.run.seed
        # The same seed on every rank while building, so replicated parts start equal;
        # per-rank streams (sampling, dropout) only for the loop.
        ckpt.seed_everything(self.seed)
        from facekd.train import reproducible
        from facekd.train.amp import resolve_amp

        self.reproducibility, self._saved_repro = reproducible.apply(
            self.device, r.run.threads, r.run.deterministic)
        self.amp_mode = resolve_amp(r.run.amp, self.device)
        self.amp = self.amp_mode.enabled
        self.channels_last = (r.run.channels_last if r.run.channels_last is not None
                              else self.device.type == "cuda" and self.amp)
        log.info("rank %d/%d on %s, seed %d, amp %s", self.dist.rank, self.dist.world_size,
                 self.device, self.seed, self.amp_mode.name)
        self._build_data()
        self._build_method_class()
        self._build_teacher()
        # Loading a teacher draws from the RNG (its module init); reseed so the student
        # starts the same whether the teacher is live, cached or absent.
        ckpt.seed_everything(self.seed)
        self._build_student()
        self._build_method()
        self._build_head()
        self._build_optimizer()
        ckpt.seed_everything(self.seed + self.dist.rank)

    def _build_data(self) -> None:
        if self.loader_factory is not None:
            build_train_loader = self.loader_factory
        else:
            from facekd.data.loader import build_train_loader

        r = self.recipe
        if not r.data.train:
            raise ConfigError("data.train: no training data given (a shards folder or a "
                              ".rec dataset folder)")
        common = dict(seed=r.run.seed, epoch=0, rank=self.dist.rank,
                      world_size=self.dist.world_size, num_workers=r.data.num_workers,
                      flip=r.data.flip, drop_last=True)
        # P x K identity-grouped batches for relation losses; passed only when asked for,
        # so loader stand-ins without the option keep working
        grouped = ({"images_per_identity": r.data.images_per_identity}
                   if r.data.images_per_identity != 1 else {})
        if self.device.type == "cuda":
            # page-locked batches: the non_blocking copies in train_step really overlap
            common["pin_memory"] = True
        if r.data.decode == "device":
            common["decode_device"] = self.device
        # float input batches recycled step to step (BufferPool: no fresh pages per step)
        from facekd.data.loader import BufferPool

        self._input_pool = BufferPool()
        self.loader = build_train_loader(r.data.train, r.data.batch_size, labelled=True,
                                         **common, **grouped)
        self.num_classes = int(self.loader.num_classes)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch <= 0:
            raise ConfigError(f"data.train: {r.data.train} has fewer samples than one global "
                              f"batch ({r.data.batch_size} x {self.dist.world_size})")
        self.unlabelled_loader = None
        if r.data.unlabelled:
            size = r.data.unlabelled_batch_size or r.data.batch_size
            self.unlabelled_loader = build_train_loader(r.data.unlabelled, size,
                                                        labelled=False, **common)
        self.total_steps = r.optim.epochs * self.steps_per_epoch
        self.warmup_steps = round(r.optim.warmup_epochs * self.steps_per_epoch)

    def _build_method_class(self) -> None:
        from facekd.distill import get_method_class

        r = self.recipe
        self.method_cls = get_method_class(r.method.name)
        # decided here, not with the head: a head the method cannot use is refused before
        # the teacher or its cache is loaded
        self.partial_fc = resolve_partial_fc(r, self.dist.world_size)
        if r.student.head.partial_fc is None and not self.partial_fc and \
                self.dist.world_size > 1:
            log.info("student head replicated on all %d ranks (not Partial FC): method '%s' "
                     "reads it", self.dist.world_size, r.method.name)

    def _build_teacher(self) -> None:
        """Live teacher or cache, only when the method asks for one."""
        r = self.recipe
        self.teacher = None
        self.teacher_centres: torch.Tensor | None = None
        self.cache = None
        self.unlabelled_cache = None
        self.teacher_dim: int | None = None
        self.teacher_feature_layers = list(r.teacher.feature_layers)
        if not self.method_cls.needs_teacher:
            return
        if r.teacher.cache:
            from facekd.train.cache import open_cache

            if self.teacher_feature_layers:
                raise ConfigError("teacher.feature_layers cannot be read from a teacher cache "
                                  "(it stores embeddings only); unset teacher.cache")
            self.cache = open_cache(r.teacher.cache)
            self.teacher_dim = self.cache.dim
            self._check_cache_teacher(self.cache)
            if self.unlabelled_loader is not None:
                if not r.teacher.unlabelled_cache:
                    raise ConfigError("teacher.cache is set and data.unlabelled is used: give "
                                      "teacher.unlabelled_cache too (a cache of that source)")
                self.unlabelled_cache = open_cache(r.teacher.unlabelled_cache)
                if self.unlabelled_cache.dim != self.cache.dim:
                    raise ConfigError("teacher.unlabelled_cache has embedding size "
                                      f"{self.unlabelled_cache.dim}, teacher.cache "
                                      f"{self.cache.dim}")
            centres = self.cache.centres_on(self.device)
        elif r.teacher.checkpoint or self.given_teacher is not None:
            if self.given_teacher is not None:
                self.teacher = self.given_teacher
            else:
                from facekd.models.teacher import load_teacher

                self.teacher = load_teacher(r.teacher.checkpoint, arch=r.teacher.arch,
                                            classifier=r.teacher.classifier,
                                            device=self.device,
                                            feature_layers=tuple(self.teacher_feature_layers))
            with torch.no_grad():
                probe = torch.zeros(2, 3, 112, 112, device=self.device)
                self.teacher_dim = int(self.teacher.embed(probe).shape[1])
            centres = self.teacher.centres
        else:
            raise ConfigError(f"method '{r.method.name}' needs a teacher: set "
                              "teacher.checkpoint (or teacher.cache from 'facekd teacher cache')")
        self.teacher_centres = centres.to(self.device) if centres is not None else None  # once

    def _check_cache_teacher(self, cache: Any) -> None:
        """A cache built from another teacher file than teacher.checkpoint is refused."""
        spec = self.recipe.teacher.checkpoint
        cached_sha = cache.meta.get("teacher_sha256")
        if not spec or not cached_sha or not Path(spec).is_file():
            return
        from facekd.fileio import sha256_file

        if sha256_file(spec) != cached_sha:
            raise ConfigError(f"teacher.cache {cache.folder} was built from another teacher "
                              f"than teacher.checkpoint {spec} (sha256 differs); rebuild it "
                              "with 'facekd teacher cache' or unset one of the two")

    def _build_student(self) -> None:
        from facekd.models import create_model

        r = self.recipe
        kwargs = dict(r.student.kwargs)
        kwargs.setdefault("num_features", r.student.embedding_size)
        self.arch_kwargs = kwargs
        self.student = create_model(r.student.arch, **kwargs).to(self.device)
        if r.student.init:
            from facekd.models.checkpoint import (
                extract_state_dict,
                load_state_into,
                read_checkpoint,
            )

            state = extract_state_dict(read_checkpoint(r.student.init), r.student.init)
            load_state_into(self.student, state, r.student.arch, r.student.init)
        if self.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        self.feature_layer_names: list[str] = []
        self.feature_channels: list[int] | None = None
        try:
            from facekd.models.registry import feature_channels, feature_layers

            self.feature_layer_names = feature_layers(self.student)
            self.feature_channels = feature_channels(self.student, self.feature_layer_names)
        except Exception as exc:  # a backbone without multi-scale stages
            if self.method_cls.needs_features:
                raise ConfigError(f"method '{r.method.name}' needs student feature maps but "
                                  f"student.arch '{r.student.arch}' exposes none ({exc})") from None
        self.hooks = None

    def _build_method(self) -> None:
        from facekd.distill import create_method, resolve_weights

        r = self.recipe
        self.method = create_method(
            r.method.name, student_dim=r.student.embedding_size, teacher_dim=self.teacher_dim,
            num_classes=self.num_classes, params=r.method.params,
            student_feature_channels=self.feature_channels).to(self.device)
        self.weights = resolve_weights(self.method, r.method.weights)
        # After construction: an instance may need less than its class (REFILLED stage 1).
        if getattr(self.method, "needs_teacher_classifier", False) and \
                self.teacher_centres is None:
            where = r.teacher.cache or r.teacher.checkpoint
            raise ConfigError(f"method '{r.method.name}' needs the teacher's classifier but "
                              f"{where} has no class centres and teacher.classifier is unset; "
                              "run 'facekd teacher centres TEACHER DATA OUT' and set "
                              "teacher.classifier: OUT")
        if getattr(self.method, "needs_features", False):
            from facekd.models.hooks import FeatureHooks

            self.hooks = FeatureHooks(self.student, self.feature_layer_names)

    def _build_head(self) -> None:
        r = self.recipe
        h = r.student.head
        if self.partial_fc:
            from facekd.models.partial_fc import PartialFC, PartialFCView, init_shard_like_full

            self.head = PartialFC(
                r.student.embedding_size, self.num_classes, kind=h.type, scale=h.scale,
                margin=h.margin, m1=h.m1, m2=h.m2, m3=h.m3, sample_rate=h.sample_rate,
                seed=r.run.seed, rank=self.dist.rank,
                world_size=self.dist.world_size).to(self.device)
            init_shard_like_full(self.head, r.run.seed)
            self.method_head: nn.Module = PartialFCView(self.head)
        else:
            from facekd.models.heads import create_head

            self.head = create_head(h.type, r.student.embedding_size, self.num_classes,
                                    scale=h.scale, margin=h.margin, m1=h.m1, m2=h.m2,
                                    m3=h.m3).to(self.device)
            self.method_head = self.head
        if self.dist.enabled:
            if self.device.type == "cuda" and r.run.sync_bn:
                self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            ids = [self.device.index] if self.device.type == "cuda" else None
            with warnings.catch_warnings():  # broadcast_buffers' rename warning (torch 2.14)
                warnings.simplefilter("ignore", FutureWarning)
                self.student_ddp: nn.Module = nn.parallel.DistributedDataParallel(
                    self.student, device_ids=ids, broadcast_buffers=False)
        else:
            self.student_ddp = self.student
        # the forward the step calls; student_ddp stays the module that is saved/unwrapped
        self.student_forward: Callable[..., torch.Tensor] = self.student_ddp
        if r.run.compile:
            self.student_forward = torch.compile(self.student_ddp)

    def _build_optimizer(self) -> None:
        r = self.recipe
        params = [p for module in (self.student, self.head, self.method)
                  for p in module.parameters() if p.requires_grad]
        self.trainable = params
        head_ids = {id(p) for p in self.head.parameters()}
        self.head_index = {i for i, p in enumerate(params) if id(p) in head_ids}
        self.replicated = [p for p in self.method.parameters() if p.requires_grad]
        if not self.partial_fc:
            self.replicated += [p for p in self.head.parameters() if p.requires_grad]
        # Clipped like arcface_torch: the backbone alone. A method's own parts (FRSKD's
        # self-teacher and its head, connectors) are clipped as a group of their own, so
        # their fresh, large gradients are not counted in the backbone's norm (what their
        # losses send into the backbone still is). Both groups are replicated on every
        # rank, so each clip factor is too.
        self.clip_groups = [group for group in (
            [p for p in self.student.parameters() if p.requires_grad],
            [p for p in self.method.parameters() if p.requires_grad]) if group]
        self.unlabelled_iter: _Cycle | None = None
        o = r.optim
        fused = {"fused": True} if (o.fused if o.fused is not None
                                    else self.device.type == "cuda") else {}
        if o.name == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, **fused)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay,
                                               **fused)
        from facekd.train.amp import prepare_fused

        prepare_fused(self.optimizer)
        # steps skipped for a non-finite loss/gradient: a device counter, read when logging
        self.skipped_steps = torch.zeros((), device=self.device)
        self.schedule = StepSchedule(self.optimizer, self.total_steps, self.warmup_steps,
                                     o.schedule, power=o.poly_power)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_mode.scaler)

    # ------------------------------------------------------------------ state
    def _head_state(self) -> dict[str, Any] | None:
        """The full head (all class centres), whatever the world size (collective): on
        rank 0 only (Partial FC rows stream to it shard by shard), None elsewhere."""
        if self.partial_fc:
            return self.head.export_state(main_only=True)
        return self.head.export_state() if self.dist.is_main else None

    def _merged_head_slots(self, local: dict[int, dict[str, Any]]) -> dict[int, Any] | None:
        """The head's optimiser slots as world-size-independent merged tensors (collective).

        Partial FC slots (SGD momentum, Adam moments) have one row per local class; they
        are gathered to rank 0 into full ``num_classes``-row tensors, like the weight, so
        a resume at any world size slices its own rows (they used to restart when the
        world size changed). Scalars (Adam's step) and replicated heads' slots: rank 0's.
        """
        from facekd.models.partial_fc import gather_rows_to_main

        merged: dict[int, dict[str, Any]] = {}
        for index in sorted(local):
            slots: dict[str, Any] = {}
            for name in sorted(local[index]):
                value = local[index][name]
                rows = (self.partial_fc and isinstance(value, torch.Tensor) and value.ndim >= 1
                        and value.shape[0] == self.head.num_local)
                if rows:
                    slots[name] = gather_rows_to_main(value, self.num_classes)
                elif isinstance(value, torch.Tensor):
                    slots[name] = value.detach().cpu().clone()
                else:
                    slots[name] = value
            merged[index] = slots
        return merged if self.dist.is_main else None

    def _local_head_slots(self, merged: dict[int, Any]) -> dict[int, dict[str, Any]]:
        """This rank's share of :meth:`_merged_head_slots` (rows sliced, then copied)."""
        out: dict[int, dict[str, Any]] = {}
        for index, slots in merged.items():
            mine: dict[str, Any] = {}
            for name, value in slots.items():
                if isinstance(value, torch.Tensor):
                    if (self.partial_fc and value.ndim >= 1
                            and value.shape[0] == self.num_classes):
                        value = self.head.local_rows(value)
                    value = value.clone()  # off the checkpoint's memory map
                mine[name] = value
            out[int(index)] = mine
        return out

    def _load_head_state(self, state: dict[str, Any], source: str) -> None:
        load = getattr(self.head, "load_export_state", None)
        if callable(load):
            load(state, source=source)
            return
        weight = state.get("weight")
        if not isinstance(weight, torch.Tensor) or weight.shape != self.head.weight.shape:
            from facekd.errors import CheckpointError

            raise CheckpointError(f"{source}: head weight does not fit "
                                  f"{list(self.head.weight.shape)}")
        with torch.no_grad():
            self.head.weight.copy_(weight.to(self.head.weight.device))

    def state(self, step: int, epoch: int, in_epoch: int) -> dict[str, Any] | None:
        """The resume state (collective: every rank must call it); None on other ranks."""
        head_state = self._head_state()
        opt_state = self.optimizer.state_dict()
        # Optimiser slots of the head rows a rank holds are per rank (Partial FC shards);
        # they travel with the rank, the replicated rest is saved once.
        head_slots = {k: v for k, v in opt_state["state"].items() if k in self.head_index}
        opt_state = {"state": {k: v for k, v in opt_state["state"].items()
                               if k not in self.head_index},
                     "param_groups": opt_state["param_groups"]}
        head_optimizer = self._merged_head_slots(head_slots)  # collective
        unl = self.unlabelled_iter
        per_rank = gather_objects({"rng": ckpt.capture_rng(self.device),
                                   "loader": self.loader.state_dict(),
                                   "unlabelled_loader": (self.unlabelled_loader.state_dict()
                                                         if self.unlabelled_loader else None),
                                   "unlabelled_epoch": unl.epoch if unl is not None else 0},
                                  self.dist)
        if not self.dist.is_main:
            return None
        r = self.recipe
        return {
            "epoch": epoch, "in_epoch": in_epoch, "world_size": self.dist.world_size,
            "global_batch": r.data.batch_size * self.dist.world_size,
            "unlabelled_global_batch": (self._unlabelled_batch() * self.dist.world_size
                                        if self.unlabelled_loader is not None else None),
            "head_optimizer": head_optimizer,
            "student": _unwrap(self.student_ddp).state_dict(),
            "head": head_state,
            "method": self.method.state_dict(),
            "optimizer": opt_state,
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "skipped_steps": int(self.skipped_steps.item()),
            "ranks": per_rank,
            "seed": self.seed,
            "arch": self.recipe.student.arch,
        }

    def save(self, step: int, epoch: int, in_epoch: int) -> None:
        state = self.state(step, epoch, in_epoch)
        if state is not None:
            path = ckpt.save_state(self.out, step, state, keep=self.recipe.run.keep_checkpoints)
            log.info("checkpoint %s", path)
        barrier(self.dist)

    def _unlabelled_batch(self) -> int:
        r = self.recipe
        return r.data.unlabelled_batch_size or r.data.batch_size

    def _find_resume_checkpoint(self) -> Path | None:
        """Rank 0's latest checkpoint, checked to be readable by every rank.

        Rank 0 writes the checkpoints; on several nodes ``run.output`` must be a folder
        every node sees. Each rank deciding alone let a node with a local folder start
        from step 0 while the others resumed (a hang or silently mixed states).
        """
        from facekd.train.ddp import broadcast_object

        latest = ckpt.latest_checkpoint(self.out) if self.dist.is_main else None
        name = broadcast_object(latest.name if latest is not None else None, self.dist)
        if not self.dist.enabled:
            return latest
        # each rank looks in its own run.output: the same path string on every node
        path = ckpt.checkpoint_dir(self.out) / name if name is not None else None
        seen = gather_objects(path is None or path.is_file(), self.dist)
        blind = [rank for rank, ok in enumerate(seen) if not ok]
        if blind:
            raise ConfigError(f"run.output {self.out}: rank {blind[0]} cannot read "
                              f"{path} that rank 0 found; on several nodes run.output "
                              "must be on a filesystem every node shares")
        return path

    @staticmethod
    def _reposition_loader(saved: dict[str, Any], fresh: dict[str, Any],
                           batches: int) -> dict[str, Any]:
        """A loader state saved at another world size, moved to batch ``batches`` of this
        rank's split. Exact because the loader deals the epoch permutation round-robin
        (``perm[rank::world]``): after j batches per rank, every world size with the same
        global batch has consumed the same prefix ``perm[:j * global_batch]``."""
        state = dict(saved)
        for key in ("rank", "world_size", "batch_size"):
            if key in fresh:
                state[key] = fresh[key]
        for key in ("batches_done", "position"):   # facekd's loader / stand-ins
            if key in state:
                state[key] = batches
        return state

    def try_resume(self) -> tuple[int, int, bool]:
        """Load the latest checkpoint of the run folder: (step, epoch, mid_epoch)."""
        path = self._find_resume_checkpoint()
        self.resume_saved_step = 0
        if not self.recipe.run.resume:
            if path is not None:
                raise ConfigError(f"run.output {self.out} already has checkpoints (latest "
                                  f"{path.name}) and run.resume is false; choose a new "
                                  "run.output or set run.resume: true")
            return 0, 0, False
        if path is None:
            return 0, 0, False
        state = ckpt.load_state(path)  # to the host (memory-mapped): RNG states on the CPU
        if state.get("arch") != self.recipe.student.arch:
            from facekd.errors import CheckpointError

            raise CheckpointError(f"{path}: was trained with student.arch "
                                  f"'{state.get('arch')}', the recipe says "
                                  f"'{self.recipe.student.arch}'; use a new run.output")
        _unwrap(self.student_ddp).load_state_dict(state["student"])
        self._load_head_state(state["head"], str(path))
        self.method.load_state_dict(state["method"])
        ranks = state["ranks"]
        saved_world = int(state["world_size"])
        same_world = saved_world == self.dist.world_size
        self._load_optimizer_state(state, same_world)
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps.fill_(int(state.get("skipped_steps", 0)))
        step, epoch = int(state["step"]), int(state["epoch"])
        self.resume_saved_step = step
        in_epoch = int(state["in_epoch"])
        mid_epoch = bool(in_epoch)
        r = self.recipe
        saved_loader = ranks[0].get("loader") or {}
        saved_gb = int(state.get("global_batch") or
                       int(saved_loader.get("batch_size", r.data.batch_size)) * saved_world)
        gb = r.data.batch_size * self.dist.world_size
        self.unlabelled_state = None
        if same_world and saved_gb == gb:
            mine = ranks[self.dist.rank]
            ckpt.restore_rng(mine["rng"], self.device)
            if mid_epoch:
                self.loader.load_state_dict(mine["loader"])
            if self.unlabelled_loader is not None and mine["unlabelled_loader"] is not None:
                self.unlabelled_loader.load_state_dict(mine["unlabelled_loader"])
                self.unlabelled_state = int(mine["unlabelled_epoch"])
        else:
            step, epoch, mid_epoch = self._resume_in_another_layout(
                state, step, epoch, in_epoch, saved_gb, gb)
        log.info("resumed from %s at step %d (epoch %d)", path, step, epoch)
        self.resumed_from = str(path)
        return step, epoch, mid_epoch

    def _load_optimizer_state(self, state: dict[str, Any], same_world: bool) -> None:
        """The saved optimiser, with the head's slots for this rank: merged rows at any
        world size; per-rank slots of older checkpoints only where the layout allows."""
        saved_opt = state["optimizer"]
        ranks = state["ranks"]
        slots = {k: {n: v.clone() if isinstance(v, torch.Tensor) else v
                     for n, v in slot.items()} for k, slot in saved_opt["state"].items()}
        if state.get("head_optimizer") is not None:   # merged rows: any world size
            slots.update(self._local_head_slots(state["head_optimizer"]))
        elif same_world:                               # older checkpoints: per-rank slots
            slots.update(ranks[self.dist.rank].get("head_slots", {}))
        elif not self.partial_fc and ranks[0].get("head_slots"):
            slots.update(ranks[0]["head_slots"])  # a full head: rank 0 held all of it
        else:
            log.warning("world size changed (%d -> %d) on a checkpoint without merged head "
                        "optimiser slots: they restart", int(state["world_size"]),
                        self.dist.world_size)
        self.optimizer.load_state_dict({"state": slots,
                                        "param_groups": saved_opt["param_groups"]})

    def _resume_in_another_layout(self, state: dict[str, Any], step: int, epoch: int,
                                  in_epoch: int, saved_gb: int, gb: int
                                  ) -> tuple[int, int, bool]:
        """(step, epoch, mid_epoch) of a run saved at another world size or global batch.

        The epoch's samples in global order are perm[0:N] at any world size: continue
        after the consumed prefix (in_epoch x the old global batch), which is exact when
        the new global batch divides it. The step counter and the schedule are re-indexed
        when the global batch changed, so the run still ends after optim.epochs epochs.
        Per-rank RNG streams cannot be carried over: fresh ones.
        """
        ranks = state["ranks"]
        saved_world = int(state["world_size"])
        saved_loader = ranks[0].get("loader") or {}
        ckpt.seed_everything(self.seed + 1_000_003 * step + self.dist.rank)
        consumed = in_epoch * saved_gb
        position = consumed // gb
        if position >= self.steps_per_epoch:   # the saved epoch is done in this layout
            epoch, position, consumed = epoch + 1, 0, 0
        if consumed != position * gb:
            log.warning("resuming at global batch %d (saved at %d): epoch %d continues "
                        "at sample %d, %d samples of the previous batch are seen again",
                        gb, saved_gb, epoch, position * gb, consumed - position * gb)
        new_step = step if saved_gb == gb else epoch * self.steps_per_epoch + position
        say = log.info if saved_gb == gb else log.warning   # same global batch: exact
        say("resuming a run saved at world size %d (global batch %d) on %d "
            "processes (global batch %d): epoch %d, batch %d of %d, step %d -> "
            "%d", saved_world, saved_gb, self.dist.world_size, gb, epoch,
            position, self.steps_per_epoch, step, new_step)
        if new_step != step:
            self.schedule.step_index = new_step
            self.schedule._apply()
        mid_epoch = position > 0
        if mid_epoch:
            self.loader.load_state_dict(self._reposition_loader(
                saved_loader, self.loader.state_dict(), position))
        self._resume_unlabelled(state, ranks)
        return new_step, epoch, mid_epoch

    def _resume_unlabelled(self, state: dict[str, Any], ranks: list[dict[str, Any]]) -> None:
        """The unlabelled source's position at another world size (same rule as above)."""
        saved = ranks[0].get("unlabelled_loader")
        if self.unlabelled_loader is None or saved is None:
            return
        saved_gb = state.get("unlabelled_global_batch")
        gb = self._unlabelled_batch() * self.dist.world_size
        done = int(saved.get("batches_done", saved.get("position", 0)))
        if saved_gb is None or (done * int(saved_gb)) % gb:
            log.warning("data.unlabelled: its epoch %d restarts (global batch changed)",
                        int(ranks[0]["unlabelled_epoch"]))
            done = 0
        else:
            done = done * int(saved_gb) // gb
        self.unlabelled_loader.load_state_dict(self._reposition_loader(
            saved, self.unlabelled_loader.state_dict(), done))
        self.unlabelled_state = int(ranks[0]["unlabelled_epoch"])

    # ------------------------------------------------------------------ one step
    def teacher_output(self, images: torch.Tensor, keys: torch.Tensor, flipped: torch.Tensor,
                       n_labelled: int) -> Any:
        from facekd.distill import TeacherOutput

        if self.cache is not None:
            parts = [self.cache.lookup(keys[:n_labelled], flipped[:n_labelled], self.device,
                                       with_centres=False)]
            if n_labelled < len(keys):
                parts.append(self.unlabelled_cache.lookup(keys[n_labelled:],
                                                          flipped[n_labelled:], self.device,
                                                          with_centres=False))
            emb = torch.cat([p.embedding for p in parts]) if len(parts) > 1 \
                else parts[0].embedding
            return TeacherOutput(embedding=emb, centres=self.teacher_centres,
                                 scale=self.cache.scale, features=[])
        if self.teacher is not None:
            with torch.no_grad():
                emb = self.teacher.embed(images)
                feats = [self.teacher.features[n] for n in self.teacher_feature_layers]
            return TeacherOutput(embedding=emb.float(), centres=self.teacher_centres,
                                 scale=float(self.teacher.scale), features=feats)
        return None

    def student_ce(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.partial_fc:
            return self.head(emb, labels)
        logits = self.head(emb, labels)
        return F.cross_entropy(logits.float(), labels)

    def train_step(self, batch: dict[str, Any], unlabelled: dict[str, Any] | None
                   ) -> dict[str, float]:
        from facekd.data.loader import normalise_batch
        from facekd.distill import StudentOutput

        dev = self.device
        images = normalise_batch(batch["image"], dev, self._input_pool)
        labels = batch["label"].to(dev, non_blocking=True).long()
        keys, flipped = batch["key"], batch["flipped"]
        n_labelled = images.shape[0]
        if unlabelled is not None:
            images = torch.cat([images, normalise_batch(unlabelled["image"], dev,
                                                        self._input_pool)])
            labels = torch.cat([labels, torch.full((unlabelled["image"].shape[0],), -1,
                                                   dtype=torch.long, device=dev)])
            keys = torch.cat([torch.as_tensor(keys), torch.as_tensor(unlabelled["key"])])
            flipped = torch.cat([torch.as_tensor(flipped),
                                 torch.as_tensor(unlabelled["flipped"])])
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.amp_mode.autocast(dev):
            emb = self.student_forward(images)
            feats = self.hooks.ordered() if self.hooks is not None else []
            teacher = self.teacher_output(images, keys, flipped, n_labelled)
            terms = self.method(StudentOutput(embedding=emb, features=feats,
                                              head=self.method_head),
                                teacher, labels)
            ce = self.student_ce(emb[:n_labelled], labels[:n_labelled])
        total = self.weights.get("ce", 1.0) * ce.float()
        for name, value in terms.items():
            weight = self.weights.get(name, 1.0)
            if weight:
                total = total + weight * value.float()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        all_reduce_grads(self.replicated, self.dist)
        self.scaler.unscale_(self.optimizer)  # no-op without fp16
        grad_norm = self._step(total)
        # Detached device tensors: read (a sync) only on logging steps, by the loop.
        out = {"loss": total.detach(), "ce": ce.detach()}
        out.update({name: v.detach() for name, v in terms.items()})
        out["grad_norm"] = grad_norm
        return out

    def _step(self, total: torch.Tensor) -> torch.Tensor:
        """Clip, then step unless the loss or a gradient is non-finite (counted, not raised:
        one bad batch in fp16 must not end a week-long run). Returns the grad norm."""
        from facekd.train.amp import nonfinite_flag, step_unless

        grads = [p.grad for p in self.trainable if p.grad is not None]
        found_inf = nonfinite_flag(total, grads)
        if self.dist.enabled:  # every rank skips together, or replicated parts diverge
            import torch.distributed as tdist

            tdist.all_reduce(found_inf, op=tdist.ReduceOp.MAX)
        grad_norm = torch.full((), float("nan"), device=self.device)
        if self.recipe.optim.clip_grad is not None:
            norms = [nn.utils.clip_grad_norm_(group, self.recipe.optim.clip_grad)
                     for group in self.clip_groups]
            grad_norm = norms[0]   # the backbone's, as arcface_torch logs it
        step_unless(self.optimizer, found_inf)
        self.scaler.update()  # fp16: backs the scale off after an overflow
        self.skipped_steps += found_inf
        self.schedule.step()
        return grad_norm

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> dict[str, float]:
        """Verification accuracy on data.val_bins (rank 0; the others wait)."""
        results: dict[str, float] = {}
        bins = self.recipe.data.val_bins
        if not bins:
            return results
        if self.dist.is_main:
            if self.evaluator is None:
                log.warning("data.val_bins is set but no evaluator was given; "
                            "skipping verification")
            else:
                model = _unwrap(self.student_ddp)
                model.eval()
                try:
                    embedder = TorchEmbedder(model, name="student")  # sha256 "": no cache
                    for path in bins:
                        res = self.evaluator(embedder, path, self.recipe.run.eval_batch_size)
                        name = Path(path).stem
                        results[f"val/{name}/acc"] = float(res["acc_mean"])
                        log.info("step %d %s: acc %.4f +- %.4f", step, name,
                                 res["acc_mean"], res.get("acc_std", 0.0))
                finally:
                    model.train()
        barrier(self.dist)
        return results

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        r = self.recipe
        self.resumed_from = None
        self.unlabelled_state = None
        step, epoch, mid_epoch = self.try_resume()
        start_step = step
        stop_at = self.total_steps if r.run.max_steps is None \
            else min(self.total_steps, r.run.max_steps)
        global_batch = r.data.batch_size * self.dist.world_size
        report = _LoopReport(self, step, stop_at, global_batch)
        self._start_unlabelled(epoch)
        last: dict[str, Any] = {}
        eval_results: dict[str, float] = {}
        eval_step = -1
        t_start = time.perf_counter()
        self.student_ddp.train()
        self.head.train()
        self.method.train()
        log.info("training %s -> %s: %d steps/epoch x %d epochs, global batch %d, start "
                 "step %d", r.method.name, r.student.arch, self.steps_per_epoch,
                 r.optim.epochs, global_batch, step)
        # set before the loop: a rerun of a run that stopped mid-epoch never enters it
        in_epoch = (step - epoch * self.steps_per_epoch) if mid_epoch else 0
        while step < stop_at:
            if not mid_epoch:
                self.loader.set_epoch(epoch)
            mid_epoch = False
            finished_epoch = True
            for batch in self.loader:
                unl = next(self.unlabelled_iter) if self.unlabelled_iter is not None else None
                last = self.train_step(batch, unl)
                step += 1
                in_epoch += 1
                report.step(step, epoch, last)
                if r.run.eval_every and step % r.run.eval_every == 0:
                    eval_results, eval_step = report.evaluate(step), step
                if r.run.save_every and step % r.run.save_every == 0 and step < stop_at:
                    self.save(step, epoch, in_epoch)
                    report.flush()
                if step >= stop_at:
                    finished_epoch = in_epoch >= self.steps_per_epoch
                    break
            if finished_epoch:
                epoch += 1
                in_epoch = 0
                if not r.run.eval_every and r.data.val_bins:
                    eval_results, eval_step = report.evaluate(step), step
        report.bar.close()
        if r.data.val_bins and eval_step != step:   # the final student is always verified
            eval_results = report.evaluate(step)
        self.save(step, epoch, in_epoch if step % self.steps_per_epoch else 0)
        report.close()
        elapsed = time.perf_counter() - t_start
        return {"step": step, "epoch": epoch, "start_step": start_step,
                "last_losses": {k: float(v) for k, v in last.items()}, "eval": eval_results,
                "skipped_steps": int(self.skipped_steps.item()),
                "train_seconds": elapsed,
                "images_per_s": (step - start_step) * global_batch / max(elapsed, 1e-9)}

    def _start_unlabelled(self, epoch: int) -> None:
        """The endless unlabelled stream, at its saved position after a resume."""
        if self.unlabelled_loader is not None:
            resumed = self.unlabelled_state is not None
            self.unlabelled_iter = _Cycle(self.unlabelled_loader,
                                          self.unlabelled_state if resumed else epoch,
                                          mid_epoch=resumed)

    def finish(self, result: dict[str, Any]) -> None:
        """student.pt, full.pt and summary.json (rank 0)."""
        head_state = self._head_state()  # collective under Partial FC
        if not self.dist.is_main:
            return
        from facekd.fileio import write_json_atomic
        from facekd.models.checkpoint import save_checkpoint

        r = self.recipe
        student = _unwrap(self.student_ddp)
        meta = {"recipe": str(self.out / "recipe.yaml"), "method": r.method.name,
                "seed": self.seed, "step": result["step"], "epoch": result["epoch"],
                "num_classes": self.num_classes, "eval": result["eval"]}
        save_checkpoint(self.out / "student.pt", student, r.student.arch, self.arch_kwargs,
                        meta=meta)
        save_checkpoint(self.out / "full.pt", student, r.student.arch, self.arch_kwargs,
                        head=head_state,
                        meta={**meta, "method_state": self.method.state_dict()})
        summary = {
            "run": str(self.out), "method": r.method.name, "student": r.student.arch,
            "teacher": r.teacher.checkpoint, "teacher_cache": r.teacher.cache,
            "seed": self.seed, "world_size": self.dist.world_size,
            "device": str(self.device), "amp": self.amp_mode.name, **self.reproducibility,
            "skipped_steps": result["skipped_steps"],
            "steps": result["step"], "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch, "epochs_done": result["epoch"],
            "resumed_from": self.resumed_from, "num_classes": self.num_classes,
            "global_batch": r.data.batch_size * self.dist.world_size,
            "last_losses": result["last_losses"], "eval": result["eval"],
            "train_seconds": result["train_seconds"], "images_per_s": result["images_per_s"],
            "student_params": sum(p.numel() for p in student.parameters()),
            "torch": torch.__version__, "python": platform.python_version(),
            "outputs": {"student": "student.pt", "full": "full.pt",
                        "metrics": "metrics.csv", "log": "train.log"},
        }
        write_json_atomic(self.out / "summary.json", summary)
        log.info("run finished: %s", self.out)

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
        if hasattr(self, "_saved_level"):
            logging.getLogger("facekd").setLevel(self._saved_level)
        if hasattr(self, "_saved_repro"):
            from facekd.train import reproducible

            reproducible.restore(self._saved_repro)
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def run(self) -> Path:
        try:
            self.setup()
            result = self.fit()
            self.finish(result)
            barrier(self.dist)
        finally:
            self.close()
        return self.out


def resolve_partial_fc(recipe: Recipe, world_size: int) -> bool:
    """Whether the student's head is a Partial FC (else one head replicated on every rank).

    ``student.head.partial_fc: null`` turns it on for ``sample_rate < 1`` or several
    ranks, except for a method that reads the student's head (KD, REFILLED stage 2,
    FRSKD's KD target): sharded, no rank holds every class, so such a method gets a
    replicated head. Asked for explicitly with such a method, it is refused.
    """
    from facekd.distill.base import get_method_class, parse_params

    h = recipe.student.head
    cls = get_method_class(recipe.method.name)
    reads_head = world_size > 1 and cls.reads_student_head(parse_params(cls,
                                                                        recipe.method.params))
    partial = h.partial_fc if h.partial_fc is not None else (
        h.sample_rate < 1.0 or (world_size > 1 and not reads_head))
    if partial and reads_head:
        raise ConfigError(f"method '{recipe.method.name}' reads the student's head, which "
                          f"Partial FC would shard across the {world_size} ranks; set "
                          "student.head.partial_fc: false"
                          + (" and sample_rate: 1.0" if h.sample_rate < 1.0 else "")
                          + " (a replicated head)")
    if not partial and h.sample_rate < 1.0:
        raise ConfigError("student.head.sample_rate < 1 needs Partial FC; unset "
                          "student.head.partial_fc or set sample_rate: 1.0")
    return partial


def train(recipe: Recipe, *, loader_factory: Callable[..., Any] | None = None,
          teacher: Any = None, evaluator: Evaluator | None = None) -> Path:
    """Train per ``recipe`` (DDP when launched by torchrun); returns the run folder.

    A method trained in stages (REFILLED) runs one Trainer per stage
    (:mod:`facekd.train.stages`).
    """
    from facekd.train.stages import run_stages, stage_recipes

    world_size = launched_world_size()
    for _, stage in stage_recipes(recipe):  # a later stage's bad head fails before stage 1
        resolve_partial_fc(stage, world_size)
    return run_stages(recipe, lambda stage: Trainer(
        stage, loader_factory=loader_factory, teacher=teacher, evaluator=evaluator).run())
