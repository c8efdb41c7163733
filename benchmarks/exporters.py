"""The two ONNX exporters, TorchScript-based (`dynamo=False`, depthd's) and dynamo (`dynamo=True`),
on Depth Anything V2 Small with random weights, run by ONNX Runtime on the CPU.

    PYTHONPATH=. /tmp/dynamo-venv/bin/python benchmarks/exporters.py [--json benchmarks/results/exporters-cpu.json]

The dynamo exporter needs `onnxscript`; its recent versions pull in onnx >= 1.23 and so protobuf
6, which depthd's pinned gRPC packages exclude: run this from a separate virtual
environment holding torch, transformers, onnx, onnxscript and onnxruntime (docs/performance.md
says how), with depthd on PYTHONPATH. Without onnxscript the dynamo export's error is recorded.

One 518x686 frame (a 640x480 camera frame's processed size), batch 1. The TorchScript file is
made by depthd's own `OnnxExports` (opset 17); the dynamo file by `torch.onnx.export(...,
dynamo=True)` at its default opset. Both run under the same session options as depthd's ONNX
Runtime backend (intra-op threads = torch's, inter-op 1); the two sessions take turns, round by
round, because a shared machine drifts. Error is centred, ||got - ref|| / ||ref - mean(ref)||,
against eager float32 torch on the same input. Timings only; nothing asserts.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from depthd.engine import hardware, synthetic  # noqa: E402
from depthd.engine.backends import export  # noqa: E402

MODEL = "depth-anything-v2-small"
SIZE = (518, 686)


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def pixels(size: tuple[int, int]) -> torch.Tensor:
    """A smooth normalised image with a little noise, as a (1, 3, H, W) float32 tensor."""
    height, width = size
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    image = torch.stack([x, torch.sin(3 * y), 0.5 * x * y])
    return (image + 0.05 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0)))[None].contiguous()


def centred(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref - ref.mean()))


def export_torchscript(model, folder: Path) -> Path:
    """depthd's own path: OnnxExports with the TorchScript-based exporter at its opset."""
    exports = export.OnnxExports(MODEL, folder, {"exporter": export.EXPORTER}, lambda: model, field_of_view=False)
    return exports.path_for(SIZE)


def export_dynamo(model, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dynamo.onnx"
    network = export._Network(model, field_of_view=False).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(network, (pixels(SIZE),), dynamo=True,
                                    input_names=["pixel_values"], output_names=["predicted_depth"])
        program.save(str(path))
    return path


def describe(path: Path) -> dict[str, object]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    opsets = {entry.domain or "ai.onnx": entry.version for entry in graph.opset_import}
    sizes = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return {"opset": opsets.get("ai.onnx"), "nodes": len(graph.graph.node), "mib": round(sizes / 2**20, 1)}


def session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    report: dict[str, object] = {
        "cpu": hardware.describe_cpu(), "threads": threads, "size": list(SIZE), "model": MODEL,
        "versions": {name: version(name) for name in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")},
        "exporters": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        folder = synthetic.build(MODEL, Path(scratch) / "model")
        from transformers import AutoModelForDepthEstimation

        model = AutoModelForDepthEstimation.from_pretrained(folder).eval()
        example = pixels(SIZE)
        with torch.inference_mode():
            reference = model(pixel_values=example).predicted_depth.numpy()
        example_np = example.numpy()
        sessions = {}
        for name, make in (("torchscript", export_torchscript), ("dynamo", export_dynamo)):
            entry: dict[str, object] = {}
            report["exporters"][name] = entry
            started = time.perf_counter()
            try:
                path = make(model, Path(scratch) / name)
            except Exception as error:  # an exporter's failure is a result here
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                entry["error"] = f"{type(error).__name__}: {first[:400]}"
                print(f"{name}: export failed: {entry['error']}")
                continue
            entry["export_s"] = round(time.perf_counter() - started, 1)
            entry.update(describe(path))
            sessions[name] = session(path, threads)
            got = sessions[name].run(None, {"pixel_values": example_np})[0]
            entry["centred_error_vs_eager"] = centred(got, reference)
            sessions[name].run(None, {"pixel_values": example_np})  # warm
            entry["ms"] = []
            print(f"{name}: exported in {entry['export_s']} s, opset {entry['opset']}, {entry['nodes']} nodes, "
                  f"{entry['mib']} MiB, centred error {entry['centred_error_vs_eager']:.1e}")
        ratios = []
        for round_ in range(args.rounds):
            order = list(sessions.items())
            if round_ % 2:
                order.reverse()  # who goes first alternates, so neither always follows the other
            for name, runner in order:
                for _ in range(args.per_round):
                    started = time.perf_counter()
                    runner.run(None, {"pixel_values": example_np})
                    report["exporters"][name]["ms"].append((time.perf_counter() - started) * 1000)
            medians = {n: statistics.median(report["exporters"][n]["ms"][-args.per_round:]) for n in sessions}
            if len(medians) == 2:
                ratios.append(medians["dynamo"] / medians["torchscript"])
            print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{n} {ms:.0f} ms" for n, ms in medians.items())
                  + (f", dynamo/torchscript {ratios[-1]:.2f}" if len(medians) == 2 else ""), flush=True)
    for name in sessions:
        entry = report["exporters"][name]
        entry["median_ms"] = statistics.median(entry["ms"])
        entry["min_ms"] = min(entry["ms"])
    if ratios:
        report["dynamo_over_torchscript"] = {
            "median_of_round_ratios": statistics.median(ratios), "round_ratios": ratios,
            "of_medians": report["exporters"]["dynamo"]["median_ms"] / report["exporters"]["torchscript"]["median_ms"],
            "of_minima": report["exporters"]["dynamo"]["min_ms"] / report["exporters"]["torchscript"]["min_ms"],
        }
    report["load_average_after"] = os.getloadavg()
    print(f"\nCPU: {report['cpu']['model']} flags {', '.join(report['cpu']['flags'])}; {threads} threads")
    print("| exporter | opset | nodes | export s | ms per frame (median / min) | centred error vs eager |")
    print("|---|---|---|---|---|---|")
    for name, entry in report["exporters"].items():
        if "error" in entry:
            print(f"| {name} | | | failed: {entry['error']} | | |")
        else:
            print(f"| {name} | {entry['opset']} | {entry['nodes']} | {entry['export_s']} | {entry['median_ms']:.0f} / "
                  f"{entry['min_ms']:.0f} | {entry['centred_error_vs_eager']:.1e} |")
    if ratios:
        ratio = report["dynamo_over_torchscript"]
        print(f"dynamo / torchscript time: {ratio['median_of_round_ratios']:.2f} (median of the rounds' ratios), "
              f"{ratio['of_medians']:.2f} (of medians), {ratio['of_minima']:.2f} (of minima)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
