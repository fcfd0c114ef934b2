"""facekd.export: parity-gated ONNX export, FP16/INT8 variants and model cards.

Import the submodules (``facekd.export.onnx_export`` etc.); this package imports nothing
heavy itself so the CLI stays fast.
"""

__all__ = ["card", "commands", "onnx_export", "parity", "quantize"]
