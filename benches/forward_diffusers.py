"""The Python half of `cargo xtask bench-forward`: diffusers' forward on the same checkpoint and inputs.

Usage (xtask runs it; CI never does):
    python benches/forward_diffusers.py --model DIR --inputs IN.safetensors --repeat N --threads 2 \
        --report OUT.json [--rust-sample SAMPLE.safetensors]

It loads `HiDreamImageTransformer2DModel` in float32, runs one warm-up forward and then `--repeat`
timed ones with `torch.set_num_threads(threads)`, and writes the seconds of each to the report. With
`--rust-sample` it also reports the largest difference from the Rust output on the same inputs.
"""

import argparse
import json
import time

import torch
from diffusers import HiDreamImageTransformer2DModel
from safetensors.torch import load_file


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", required=True)
    parser.add_argument("--rust-sample")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = HiDreamImageTransformer2DModel.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    inputs = load_file(args.inputs)
    seconds = []
    with torch.no_grad():
        for run in range(args.repeat + 1):
            started = time.perf_counter()
            sample = model(**inputs, return_dict=False)[0]
            if run > 0:
                seconds.append(time.perf_counter() - started)
    report = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "median_seconds": sorted(seconds)[len(seconds) // 2],
    }
    if args.rust_sample:
        rust = load_file(args.rust_sample)["sample"]
        report["max_abs_diff_vs_rust"] = (rust - sample).abs().max().item()
        report["max_abs_expected"] = sample.abs().max().item()
    with open(args.report, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
