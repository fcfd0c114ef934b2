"""The recipe schema: what ``facekd distill RECIPE`` reads, as typed dataclasses.

Every field has a default, so a recipe file states only what differs; the resolved
recipe (defaults filled in, overrides applied) is saved in each run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from facekd.errors import ConfigError


@dataclass
class DataConfig:
    train: str = ""                       # shards folder, or a .rec dataset folder
    unlabelled: str | None = None         # optional second source (semi-supervised)
    val_bins: list[str] = field(default_factory=list)
    batch_size: int = 128                 # per process
    unlabelled_batch_size: int = 0        # 0: same as batch_size
    num_workers: int = 2
    flip: bool = True
    images_per_identity: int = 1          # K > 1: batches of batch_size/K identities x K
                                          # images (REFILLED stage 1, relation losses)
    decode: Literal["workers", "device"] = "workers"  # device: loader workers send JPEG
                                          # bytes, the batch is decoded on the training
                                          # device (nvJPEG on CUDA) when CPUs are short


@dataclass
class HeadConfig:
    type: Literal["arcface", "cosface", "combined", "softmax"] = "arcface"
    scale: float = 64.0
    margin: float | None = None           # arcface m2 (null: 0.5) / cosface m3 (null: 0.4)
    m1: float | None = None               # type: combined only (null: 1.0, 0.0, 0.0)
    m2: float | None = None
    m3: float | None = None
    sample_rate: float = 1.0              # Partial FC share of negative classes kept
    partial_fc: bool | None = None        # null: on when sample_rate < 1 or world size > 1;
                                          # false: one replicated head (small class counts)


@dataclass
class StudentConfig:
    arch: str = "mbf"
    embedding_size: int = 512
    kwargs: dict[str, Any] = field(default_factory=dict)
    head: HeadConfig = field(default_factory=HeadConfig)
    init: str | None = None               # backbone weights to start from (a student.pt;
                                          # REFILLED's stage 2); a resume overrides them


@dataclass
class TeacherConfig:
    checkpoint: str | None = None         # arcface_torch backbone, facekd checkpoint or .onnx
    arch: str | None = None               # registry name when the checkpoint is a bare state dict
    classifier: str | None = None         # class centres / Partial FC files for the teacher head
    cache: str | None = None              # teacher cache folder (facekd teacher cache)
    unlabelled_cache: str | None = None   # teacher cache of data.unlabelled
    feature_layers: list[str] = field(default_factory=list)


@dataclass
class MethodConfig:
    name: str = "none"
    weights: dict[str, float] = field(default_factory=dict)   # loss name -> weight
    params: dict[str, Any] = field(default_factory=dict)      # method hyper-parameters


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 20
    warmup_epochs: float = 0.0
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = 2.0               # arcface_torch's PolyScheduler uses 2
    clip_grad: float | None = 5.0         # max global grad norm; null: no clipping
    fused: bool | None = None             # fused optimiser kernel (skips non-finite steps
                                          # on the device, no sync); null: on CUDA only


@dataclass
class RunConfig:
    output: str = "runs/default"
    seed: int = 0
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    amp: bool | Literal["fp16", "bf16", "none"] = True  # true = fp16 + GradScaler (CUDA);
                                          # bf16: no scaler (CUDA Ampere+, or CPU autocast)
    channels_last: bool | None = None     # NHWC student input; null: on with CUDA AMP
    compile: bool = False                 # torch.compile the student (first steps compile)
    save_every: int = 1000                # steps between checkpoints
    eval_every: int = 0                   # steps between .bin evaluations (0: per epoch)
    log_every: int = 20
    max_steps: int | None = None          # stop early (tests, smoke runs); schedule unchanged
    keep_checkpoints: int = 2             # newest training checkpoints kept (0: all)
    resume: bool = True                   # continue from output/checkpoints if present
    sync_bn: bool = True                  # SyncBatchNorm under multi-GPU DDP (CUDA only)
    tensorboard: bool = True
    progress: bool = True                 # tqdm bar (rank 0)
    eval_batch_size: int = 64
    threads: int = 0                      # CPU threads for torch (0: torch's default, the
    #                                       core count); fix it so hosts give equal bits
    deterministic: bool = True            # deterministic kernels (facekd.train.reproducible)


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self, path: str = "") -> None:
        if self.run.threads < 0:
            raise ConfigError(f"run.threads must be >= 0 (0: torch's default), "
                              f"got {self.run.threads}")
        if self.data.batch_size <= 0:
            raise ConfigError(f"data.batch_size must be positive, got {self.data.batch_size}")
        if self.data.images_per_identity < 1 or \
                self.data.batch_size % self.data.images_per_identity:
            raise ConfigError(f"data.batch_size ({self.data.batch_size}) must be a multiple of "
                              f"data.images_per_identity ({self.data.images_per_identity}, "
                              f">= 1)")
        _check_head_keys(self.student.head)
        if not 0.0 < self.student.head.sample_rate <= 1.0:
            raise ConfigError("student.head.sample_rate must be in (0, 1], "
                              f"got {self.student.head.sample_rate}")
        positive = {"optim.epochs": self.optim.epochs, "optim.lr": self.optim.lr,
                    "student.embedding_size": self.student.embedding_size,
                    "run.log_every": self.run.log_every,
                    "run.eval_batch_size": self.run.eval_batch_size}
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        non_negative = {"optim.warmup_epochs": self.optim.warmup_epochs,
                        "optim.weight_decay": self.optim.weight_decay,
                        "run.save_every": self.run.save_every,
                        "run.eval_every": self.run.eval_every,
                        "data.num_workers": self.data.num_workers,
                        "data.unlabelled_batch_size": self.data.unlabelled_batch_size,
                        "run.keep_checkpoints": self.run.keep_checkpoints}
        for key, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{key} must not be negative, got {value}")
        if self.optim.warmup_epochs > self.optim.epochs:
            raise ConfigError(f"optim.warmup_epochs ({self.optim.warmup_epochs}) exceeds "
                              f"optim.epochs ({self.optim.epochs})")
        if self.run.max_steps is not None and self.run.max_steps <= 0:
            raise ConfigError(f"run.max_steps must be positive or null, got {self.run.max_steps}")
        if self.optim.clip_grad is not None and self.optim.clip_grad <= 0:
            raise ConfigError(f"optim.clip_grad must be positive or null, "
                              f"got {self.optim.clip_grad}")
        if self.teacher.unlabelled_cache and not self.data.unlabelled:
            raise ConfigError("teacher.unlabelled_cache is set but data.unlabelled is not")


def _check_head_keys(head: HeadConfig) -> None:
    """Refuse head keys the chosen type would ignore: a value there is a mistake that
    would otherwise train a different head than the recipe reads."""
    neutral = {"m1": 1.0, "m2": 0.0, "m3": 0.0}
    if head.type != "combined":
        for key, plain in neutral.items():
            value = getattr(head, key)
            if value is not None and value != plain:
                raise ConfigError(f"student.head.{key} = {value} is read only with "
                                  f"type: combined (type is {head.type}; use "
                                  f"student.head.margin for {head.type})")
    if head.type in ("combined", "softmax") and head.margin is not None:
        raise ConfigError(f"student.head.margin = {head.margin} is not read with "
                          f"type: {head.type} (combined takes m1/m2/m3)")


def load_recipe(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    from facekd.config import load_config

    return load_config(Recipe, path, overrides)


def recipes_dir() -> Path:
    """The recipes facekd ships: package data in an installed wheel; in a clone,
    ``facekd/recipes`` links to the repository's ``recipes/`` folder, so both read the same
    files."""
    from importlib.resources import files

    here = Path(str(files("facekd") / "recipes"))
    if not (here / "teacher_synth.yaml").is_file():
        raise ConfigError(f"{here}: facekd's recipe files are missing (a broken install?)")
    return here


def shipped_recipe(name: str) -> Path:
    """``recipes_dir() / name`` (``.yaml`` added when missing), which must exist."""
    path = recipes_dir() / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in recipes_dir().glob("*.yaml")))
        raise ConfigError(f"no shipped recipe '{name}'; known: {known}")
    return path
