"""What every distillation method shares: its inputs, its outputs and the registry.

A method is a small ``nn.Module`` registered by name. The trainer builds it with
:func:`create_method`, calls it once per step with the student's and the teacher's
outputs, and gets back a dict of *unweighted* named loss terms; it multiplies each term
by :func:`resolve_weights` (the method's ``default_weights`` overridden by the recipe's
``method.weights``) and adds the student's own margin-head CE (``"ce"``) on labelled rows.
Extra trainable parts (connectors, a self-teacher) live inside the method, so the
trainer optimises ``method.parameters()`` with the student and drops them at export.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from facekd.errors import ConfigError

__all__ = [
    "DistillMethod",
    "Stage",
    "StudentOutput",
    "TeacherOutput",
    "create_method",
    "get_method_class",
    "list_methods",
    "register_method",
    "resolve_weights",
]


@dataclass
class StudentOutput:
    """The student's side of one step.

    ``embedding``: B x D raw (not normalised) embeddings, with grad.
    ``features``: multi-scale feature maps read by forward hooks (last spatial map
    last); empty when the method does not need them.
    ``head``: the student's margin head (``cos_logits(emb, class_idx=None)``,
    ``forward(emb, labels)``), or None when the method does not use it.
    """

    embedding: Tensor
    features: list[Tensor] = field(default_factory=list)
    head: nn.Module | None = None


@dataclass
class TeacherOutput:
    """The teacher's side of one step (live or from the teacher cache).

    ``embedding``: B x D_t raw teacher embeddings (no grad).
    ``centres``: C x D_t L2-normalised class centres (the teacher's margin-head weight
    rows, or mean teacher embeddings of the student's dataset), or None.
    ``scale``: the teacher head's logit scale ``s`` (logits = s * cos).
    ``features``: hooked teacher feature maps, usually empty.
    """

    embedding: Tensor
    centres: Tensor | None = None
    scale: float = 64.0
    features: list[Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class Stage:
    """One run of a method trained in stages (REFILLED): recipe values set for it.

    ``values`` maps dotted recipe keys to values; ``init_from`` names an earlier stage
    whose final student this one starts from. The last stage writes the run folder itself,
    earlier ones a sub-folder named after them.
    """

    name: str
    values: dict[str, Any]
    init_from: str | None = None


class DistillMethod(nn.Module):
    """Base class: subclasses set ``Params`` (a dataclass) and implement ``forward``.

    Class attributes tell the trainer what to provide. An instance may override them
    when a parameter changes the answer (e.g. SRD with a feature-map connector needs
    the student's feature maps).
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type] = type(None)
    needs_teacher: ClassVar[bool] = True
    needs_teacher_classifier: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False
    default_weights: ClassVar[dict[str, float]] = {}

    def __init__(self, *, student_dim: int, teacher_dim: int | None, num_classes: int,
                 params: Any, student_feature_channels: list[int] | None = None) -> None:
        super().__init__()
        self.student_dim = int(student_dim)
        self.teacher_dim = None if teacher_dim is None else int(teacher_dim)
        self.num_classes = int(num_classes)
        self.params = params
        self.student_feature_channels = (None if student_feature_channels is None
                                         else [int(c) for c in student_feature_channels])

    @property
    def loss_names(self) -> list[str]:
        """The names of the terms ``forward`` may return."""
        return list(self.default_weights)

    @classmethod
    def reads_student_head(cls, params: Any) -> bool:
        """Whether ``forward`` reads the student's margin head (its logits over all
        classes): a Partial FC sharded across ranks holds no rank's full set, so the
        trainer gives such a method a replicated head."""
        return False

    @classmethod
    def stages(cls, params: Any, recipe: Any) -> list[Stage]:
        """The runs a recipe of this method is split into; [] (one run) for most."""
        return []

    def forward(self, student: StudentOutput, teacher: TeacherOutput | None,
                labels: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _require_teacher(self, teacher: TeacherOutput | None,
                         centres: bool = False) -> TeacherOutput:
        """Fail with a message that names the method when the trainer gave no teacher."""
        if teacher is None:
            raise ConfigError(f"method '{self.name}' needs a teacher (teacher.checkpoint "
                              "or teacher.cache in the recipe)")
        if centres and teacher.centres is None:
            raise ConfigError(f"method '{self.name}' needs the teacher's class centres "
                              "(teacher.classifier in the recipe, or `facekd teacher centres`)")
        return teacher

    def extra_repr(self) -> str:
        return f"params={self.params}"


_REGISTRY: dict[str, type[DistillMethod]] = {}
M = TypeVar("M", bound=type[DistillMethod])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: make ``cls`` available to recipes as ``method.name: <name>``."""

    def deco(cls: M) -> M:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"distillation method '{name}' registered twice")
        if not dataclasses.is_dataclass(cls.Params):
            raise TypeError(f"{cls.__name__}.Params must be a dataclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _ensure_builtin() -> None:
    # Importing the modules registers the built-in methods; done lazily so importing
    # facekd.distill.base alone stays cheap and side-effect free.
    import importlib

    for module in ("baselines", "srd", "refilled", "frskd", "adadistill", "ekd"):
        importlib.import_module(f"facekd.distill.{module}")


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    _ensure_builtin()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[DistillMethod]:
    """The class registered as ``name``; unknown names raise ConfigError with a hint."""
    _ensure_builtin()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"method.name: unknown distillation method '{name}'{hint} "
                          f"(choose from {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def parse_params(cls: type[DistillMethod], params: Mapping[str, Any] | Any) -> Any:
    """Build ``cls.Params`` strictly: unknown keys and bad types raise ConfigError."""
    from facekd.config import from_dict

    if isinstance(params, cls.Params):
        return params
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"method.params: expected a mapping, got {type(params).__name__}")
    return from_dict(cls.Params, params, "method.params")


def create_method(name: str, *, student_dim: int, teacher_dim: int | None, num_classes: int,
                  params: Mapping[str, Any] | None = None,
                  student_feature_channels: list[int] | None = None) -> DistillMethod:
    """Build the method ``name`` with its typed, checked ``params``."""
    cls = get_method_class(name)
    typed = parse_params(cls, params)
    return cls(student_dim=student_dim, teacher_dim=teacher_dim, num_classes=num_classes,
               params=typed, student_feature_channels=student_feature_channels)


def resolve_weights(method: DistillMethod, weights: Mapping[str, float] | None) -> dict[str, float]:
    """The weight of each loss term: the method's defaults, overridden by the recipe.

    A recipe weight may also name ``ce`` (the trainer's own CE); any other unknown
    name raises ConfigError with a hint, so a typo does not silently weigh nothing.
    """
    out = {k: float(v) for k, v in method.default_weights.items()}
    known = set(out) | {"ce"}
    for key, value in (weights or {}).items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"method.weights: '{key}' is not a loss of method "
                              f"'{method.name}'{hint} (its losses: {', '.join(sorted(known))})")
        out[key] = float(value)
    out.setdefault("ce", 1.0)
    return out


def zero_loss(ref: Tensor) -> Tensor:
    """A zero that keeps the graph connected to ``ref`` (DDP wants every parameter used)."""
    return ref.sum() * 0.0


def as_float(t: Tensor) -> Tensor:
    """Losses are computed in float32 even under AMP, for stable softmax/MSE."""
    return t.float() if t.dtype != torch.float32 else t
