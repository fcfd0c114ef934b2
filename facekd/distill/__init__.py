"""facekd.distill: distillation methods as loss modules (never training loops).

``create_method(name, student_dim=..., teacher_dim=..., num_classes=..., params={...})``
builds a registered method; ``method(StudentOutput, TeacherOutput | None, labels)``
returns a dict of named, unweighted loss terms. See :mod:`facekd.distill.base`.
"""

from facekd.distill.base import (
    DistillMethod,
    StudentOutput,
    TeacherOutput,
    create_method,
    get_method_class,
    list_methods,
    register_method,
    resolve_weights,
)

__all__ = [
    "DistillMethod",
    "StudentOutput",
    "TeacherOutput",
    "create_method",
    "get_method_class",
    "list_methods",
    "register_method",
    "resolve_weights",
]
