"""The Python half of `cargo xtask bench-forward`: diffusers' forward on the same checkpoint and inputs.

Usage (xtask runs it; CI never does):
    python benches/forward_diffusers.py --model DIR --inputs IN.safetensors --repeat N --threads 2 \
        --report OUT.json [--rust-sample SAMPLE.safetensors]
    python benches/forward_diffusers.py --whole-process --model DIR --inputs IN.safetensors --threads 2 \
        --out SAMPLE.safetensors --report OUT.json
    python benches/forward_diffusers.py --diff A.safetensors B.safetensors --report OUT.json

It loads `HiDreamImageTransformer2DModel` in float32, runs one warm-up forward and then `--repeat`
timed ones with `torch.set_num_threads(threads)`, and writes the seconds of each to the report. With
`--rust-sample` it also reports the largest difference from the Rust output on the same inputs.

With `--whole-process` it is the process that `bench-forward --whole-process` times from outside, as
a user would wait for it: import, `from_pretrained`, one forward, and the sample written to `--out`;
the report holds the seconds of each phase as seen from inside. `--diff` compares the `sample` of two
files (outside any timing).
"""

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from diffusers import HiDreamImageTransformer2DModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

IMPORTED = time.perf_counter()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--inputs")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", required=True)
    parser.add_argument("--rust-sample")
    parser.add_argument("--whole-process", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--diff", nargs=2, metavar=("A", "B"))
    args = parser.parse_args()

    if args.diff:
        return diff(*args.diff, args.report)
    if not (args.model and args.inputs) or (args.whole_process and not args.out):
        parser.error("--model and --inputs are required, and --out with --whole-process")
    torch.set_num_threads(args.threads)
    if args.whole_process:
        return whole_process(args)
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


def whole_process(args):
    loading = time.perf_counter()
    model = HiDreamImageTransformer2DModel.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    inputs = load_file(args.inputs)
    forwarding = time.perf_counter()
    with torch.no_grad():
        sample = model(**inputs, return_dict=False)[0]
    writing = time.perf_counter()
    save_file({"sample": sample.contiguous()}, args.out)
    done = time.perf_counter()
    report = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "import_seconds": IMPORTED - STARTED,
        "load_seconds": forwarding - loading,
        "forward_seconds": writing - forwarding,
        "write_seconds": done - writing,
    }
    with open(args.report, "w") as f:
        json.dump(report, f, indent=2)


def diff(a, b, report_path):
    a, b = load_file(a)["sample"], load_file(b)["sample"]
    report = {"max_abs_diff": (a - b).abs().max().item(), "max_abs": b.abs().max().item()}
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
