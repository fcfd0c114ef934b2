"""facekd.export: parity-gated ONNX export, FP16/INT8 variants and model cards.

Import the submodules (``facekd.export.onnx_export`` etc.); this package imports nothing
heavy itself so the CLI stays fast.
"""

__all__ = ["calibration", "card", "checks", "commands", "edge", "fp16", "graph", "int8",
           "int8_rewrites", "ncnn_export", "onnx_export", "parity", "tflite_export",
           "tflite_lower", "variants"]
