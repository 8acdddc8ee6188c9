"""An example handle's ``preprocess`` alone (ResNet-18's, or with ``--example yolov3`` YOLOv3's), by
picture, form and decoding choice, in CPU time.

One process, the handle set up as a CPU worker sets it up (one thread); for each picture and form
(``raw``: the JPEG's bytes, ``base64``: ``{"img": "<base64>"}``) it times ``preprocess`` three ways,
in alternating runs so that the machine's drift falls on each alike:

- ``full``: as served by default (base64 decoded by pybase64, the JPEG decoded whole, then resized);
- ``stdlib b64``: the same with the standard library's base64 decoder (what easyserve used before);
- ``jpeg_draft``: the handle with ``jpeg_draft: true`` (libjpeg decodes at a reduced scale).

Prints a markdown table of medians, in CPU-ms a call, and the mean absolute difference, in 0-255
pixel levels, between what ``full`` and ``jpeg_draft`` feed the model::

    python benchmarks/resnet18_inputs.py     # once: the model and the pictures
    python benchmarks/preprocess.py
    python benchmarks/preprocess.py --example yolov3     # its model: the offline stand-in
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import resnet18_targets as targets  # noqa: E402
from resnet18_inputs import OUT, PICTURES, write_inputs  # noqa: E402

import easyserve.handle as handle_module  # noqa: E402
from easyserve.standins import write_standin  # noqa: E402

YOLOV3 = f"{targets.ROOT / 'handles' / 'coco_yolov3.py'}:CocoYolov3Handle"


def handle(example: str, path: Path, form: str, jpeg_draft: bool) -> tuple:
    """The handle, set up as a one-thread CPU worker sets it up, and a request of ``path`` as ``form``."""
    spec = {"model": str(targets.MODEL), "threads": 1, "index": 0, "picture": str(path), "form": form, "batch": 1,
            "handle_args": {"jpeg_draft": jpeg_draft}}
    if example == "yolov3":  # preprocess does not use the model: the stand-in sets the handle up
        spec.update(handle=YOLOV3, model=str(OUT / "yolov3-10.onnx"))
    built, [task] = targets.direct_handle(spec)
    return built, task


def pixel_levels(full, drafted, task: dict) -> float:
    """The mean absolute difference, in 0-255 levels, between what the two feed the model."""
    whole, scaled = full.preprocess(task), drafted.preprocess(task)
    if isinstance(whole, tuple):  # YOLOv3: pixels in 0-1, and the picture's size
        return float(abs(whole[0] - scaled[0]).mean() * 255)
    std = sys.modules[type(full).__module__].STD[:, None, None]  # ResNet-18: normalised, back to levels
    return float((abs(whole - scaled) * std).mean())


def cpu_ms(fn, task: dict, calls: int) -> float:
    started = time.process_time()
    for _ in range(calls):
        fn(task)
    return (time.process_time() - started) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="alternating runs of each way")
    parser.add_argument("--calls", type=int, default=20, help="calls of preprocess in each run")
    parser.add_argument("--example", choices=["resnet18", "yolov3"], default="resnet18")
    args = parser.parse_args()
    write_inputs()
    if args.example == "yolov3" and not (OUT / "yolov3-10.onnx").exists():
        write_standin("yolov3", OUT)
    fast = handle_module._fast_b64decode
    ways = ["full", "stdlib b64", "jpeg_draft"]
    columns = [f"{way} (CPU-ms)" for way in ways] + ["jpeg_draft's pixels: mean difference"]
    print("| picture | form | " + " | ".join(columns) + " |")
    print("|---|---|" + "---:|" * (len(ways) + 1))
    for name, path in PICTURES.items():
        for form in ("raw", "base64"):
            (full, task), (drafted, _) = (handle(args.example, path, form, draft) for draft in (False, True))
            setups = {"full": (full, fast), "stdlib b64": (full, None), "jpeg_draft": (drafted, fast)}
            times: dict[str, list[float]] = {way: [] for way in ways}
            for run in range(args.runs):
                for way in (ways if run % 2 == 0 else ways[::-1]):
                    built, decoder = setups[way]
                    handle_module._fast_b64decode = decoder
                    times[way].append(cpu_ms(built.preprocess, task, args.calls))
            handle_module._fast_b64decode = fast
            levels = pixel_levels(full, drafted, task)
            print(f"| {name} | {form} | " + " | ".join(f"{statistics.median(times[w]):.2f}" for w in ways) +
                  f" | {levels:.2f} |")


if __name__ == "__main__":
    main()
