"""facekd: distil large ArcFace teachers into small face embedders.

The package is laid out along the pipeline: ``data`` -> ``models`` -> ``distill`` ->
``train`` -> ``evaluate`` -> ``export``. Importing ``facekd`` loads nothing heavy.
"""

__version__ = "0.1.0"
