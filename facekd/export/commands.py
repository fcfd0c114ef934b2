"""CLI group ``facekd export``: ``facekd export onnx|ncnn|tflite CKPT OUT [options]``."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("export", help="export a student to ONNX, NCNN or LiteRT "
                                          "(parity-gated)")
    commands = group.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    p = commands.add_parser(
        "onnx", help="export a student backbone to ONNX with a parity gate and model card",
        description="Export the student backbone (heads and connectors dropped) to ONNX: "
                    "input 'data' Nx3x112x112 float32 RGB, output 'embedding'. The file is "
                    "written only if onnxruntime matches torch on a fixed batch of faces and "
                    "the insightface recognition-challenge checks pass. A model card "
                    "(.card.json/.card.md) is written next to every exported file.")
    p.add_argument("checkpoint", metavar="CKPT",
                   help="facekd run folder (its student.pt), facekd checkpoint, or an "
                        "arcface_torch state dict (with --arch)")
    p.add_argument("output", metavar="OUT.onnx", help="output file; variants get .fp16/.int8")
    p.add_argument("--arch", help="registry name when CKPT is a plain state dict")
    p.add_argument("--fp16", action="store_true", help="also write OUT.fp16.onnx (IO float32)")
    p.add_argument("--int8", action="store_true",
                   help="also write OUT.int8.onnx (static QDQ, needs --calib-data)")
    p.add_argument("--normalize-inside", action="store_true",
                   help="put (x - 127.5) / 127.5 in the graph (input is raw 0..255 RGB)")
    p.add_argument("--simplify", action="store_true", help="simplify the graph with onnxsim")
    p.add_argument("--calib-data", metavar="DATA",
                   help="INT8 calibration images: shards folder, RecordIO folder/.rec or .bin")
    p.add_argument("--calib-count", type=int, default=256, metavar="N",
                   help="number of calibration images (default 256)")
    p.add_argument("--eval-bin", metavar="BIN",
                   help=".bin verification set to measure each variant's accuracy on")
    p.add_argument("--max-drop", type=float, default=0.01, metavar="X",
                   help="largest accepted accuracy drop of a quantised variant vs FP32, as a "
                        "fraction (default 0.01 = one point)")
    p.add_argument("--force", action="store_true",
                   help="keep quantised variants that fail their checks (warns loudly)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17; default 17)")
    p.set_defaults(func=_onnx)
    _register_edge(commands)


def _register_edge(commands: argparse._SubParsersAction) -> None:
    """``export ncnn`` and ``export tflite``: the ONNX command's options, other runtimes."""
    for name, suffix, what in (
            ("ncnn", ".param", "NCNN (pnnx) .param + .bin, run in the ncnn package"),
            ("tflite", ".tflite", "LiteRT (TFLite) flatbuffer, run in ai-edge-litert")):
        p = commands.add_parser(
            name, help=f"export a student backbone to {what.split(' ')[0]} "
                       f"(needs facekd[edge])",
            description=f"Export the student backbone to {what}. The file is kept only if "
                        f"its runtime matches torch on the fixed batch of faces (as for "
                        f"ONNX); FP16/INT8 variants are judged on --eval-bin with "
                        f"--max-drop. A model card is written next to every file. Needs the "
                        f"runtimes: pip install 'facekd[edge]'.")
        p.add_argument("checkpoint", metavar="CKPT",
                       help="facekd run folder (its student.pt), facekd checkpoint, or an "
                            "arcface_torch state dict (with --arch)")
        p.add_argument("output", metavar=f"OUT{suffix}",
                       help="output file; variants get .fp16/.int8"
                            + (" (the weights go to OUT.bin)" if name == "ncnn" else ""))
        p.add_argument("--arch", help="registry name when CKPT is a plain state dict")
        p.add_argument("--fp16", action="store_true", help="also write the FP16 variant")
        p.add_argument("--int8", action="store_true",
                       help="also write the INT8 variant (calibrated, needs --calib-data)")
        p.add_argument("--normalize-inside", action="store_true",
                       help="put (x - 127.5) / 127.5 in the graph (input is raw 0..255 RGB)")
        p.add_argument("--calib-data", metavar="DATA",
                       help="INT8 calibration images: shards folder, RecordIO folder/.rec or "
                            ".bin (the same images as the ONNX INT8 for the same options)")
        p.add_argument("--calib-count", type=int, default=256, metavar="N",
                       help="number of calibration images (default 256)")
        p.add_argument("--eval-bin", metavar="BIN",
                       help=".bin verification set to measure each variant's accuracy on, "
                            "in the runtime")
        p.add_argument("--max-drop", type=float, default=0.01, metavar="X",
                       help="largest accepted accuracy drop of a quantised variant vs FP32, "
                            "as a fraction (default 0.01 = one point)")
        p.add_argument("--force", action="store_true",
                       help="keep quantised variants that fail their checks (warns loudly)")
        if name == "tflite":
            p.add_argument("--simplify", action="store_true",
                           help="simplify the ONNX trace the flatbuffer is lowered from")
            p.add_argument("--opset", type=int, default=17,
                           help="opset of that ONNX trace (>= 17; default 17)")
        p.set_defaults(func=_edge, edge_format=name)


def _edge(args: argparse.Namespace) -> int:
    from facekd.export.edge import export_edge

    if args.edge_format == "ncnn":
        from facekd.export.ncnn_export import NcnnFormat

        fmt = NcnnFormat()
    else:
        from facekd.export.tflite_export import TfliteFormat

        fmt = TfliteFormat(simplify=args.simplify, opset=args.opset)
    card = export_edge(
        fmt, args.checkpoint, args.output, arch=args.arch, fp16=args.fp16, int8=args.int8,
        normalize_inside=args.normalize_inside, calib_data=args.calib_data,
        calib_count=args.calib_count, eval_bin=args.eval_bin, max_drop=args.max_drop,
        force=args.force)
    _print_summary(card)
    return 0


def _print_summary(card: dict) -> None:
    summary = {name: {"file": v.get("file"),
                      "max_one_minus_cos": v["parity"]["max_one_minus_cos"],
                      "accuracy": (v.get("evaluation") or {}).get("accuracy"),
                      "verdict": v.get("verdict", {}).get("reason") or "accepted"}
               for name, v in card["variants"].items()}
    print(json.dumps(summary, indent=2))


def _onnx(args: argparse.Namespace) -> int:
    from facekd.export.onnx_export import export_onnx

    card = export_onnx(
        args.checkpoint, args.output, arch=args.arch, fp16=args.fp16, int8=args.int8,
        normalize_inside=args.normalize_inside, simplify=args.simplify,
        calib_data=args.calib_data, calib_count=args.calib_count, eval_bin=args.eval_bin,
        max_drop=args.max_drop, force=args.force, opset=args.opset)
    _print_summary(card)
    return 0
