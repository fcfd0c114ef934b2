"""facekd.distill: distillation methods as loss modules (never training loops).

``create_method(name, student_dim=..., teacher_dim=..., num_classes=..., params={...})``
builds a registered method; ``method(StudentOutput, TeacherOutput | None, labels)``
returns a dict of named, unweighted loss terms. See :mod:`facekd.distill.base`.

==========  =================================  ===========================================
method      loss terms (default weight)        needs
==========  =================================  ===========================================
srd         srd (1), feat (1)                  teacher embedding + class centres; feature
                                               maps with ``connector: feature``
refilled    relation (1000) in stage 1,        teacher embedding; centres for stage 2;
            local_kd (1) in stage 2            two trainer runs (facekd.train.stages)
frskd       self_ce (1), attention (100),      student feature maps (no teacher)
            soft (2)
adadistill  adadistill (1), ce (0)             teacher embedding (centres are its own)
ekd         ekd (1)                            teacher embedding; pairs of one identity
kd          kd (1)                             teacher centres over the student's classes
feature     feature (1)                        teacher embedding
rkd         rkd_distance (25), rkd_angle (50)  teacher embedding
none        (none)                             nothing
==========  =================================  ===========================================

The trainer adds the student's margin-head CE as ``ce`` (weight 1) on labelled rows;
``method.weights`` in a recipe overrides any of these (:func:`resolve_weights`).
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
