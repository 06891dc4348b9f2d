#!/usr/bin/env bash
# The GPU check: one prepared script that measures hidream on a device and writes
# OUT/gpu-report.json and OUT/gpu-report.md. Every figure in them is measured by this run.
#
#   scripts/gpu-check.sh OUT [--device cuda] [--preset full] [--layers 8,8] [--latent 128x128]
#                            [--tokens 128] [--steps 2] [--hidream .gpu/hidream] [--work DIR]
#
# On the GPU machine (the Dev setting at 1024²: 4096 image tokens, 128 + 128 text tokens):
#   scripts/gpu-check.sh bench/gpu/$(date -u +%F) --device cuda
# Before a device is lent, the same script on the CPU, on the small preset:
#   scripts/gpu-check.sh target/gpu-check-cpu --device cpu --preset small --latent 32x32 --hidream target/release/hidream
#
# What it does, in order:
#   1. records nvidia-smi and the driver's figures (when there is one) and the binary's libraries;
#   2. measures the host-to-device bandwidth of the staged upload path (`hidream bandwidth`);
#   3. synthesises a checkpoint of the preset (a full-width slice with --layers) in bf16 on local disk;
#   4. runs `hidream denoise` under `all`, `stream`, and `budget` at 24, 8 and 3 GiB scaled to the
#      slice (the same share of its weights as of the whole model's, and never below the slice's
#      smallest working budget), each with the precomputation, and `hidream plan`'s prediction for each;
#   5. checks the tiny golden transformer in bf16 on the device against diffusers' f32 output,
#      within the golden tests' bf16 bound;
#   6. writes the report: peaks measured and from the ledger, seconds, stall and bytes streamed per
#      step, the lower bound max(compute time of `all`, streamed bytes / bandwidth) and the ratio
#      to it, and whether every output is bit-identical to `all`.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
out="$1"; shift
device=cuda preset=full layers=8,8 latent=128x128 tokens=128 steps=2 hidream="" work=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --preset) preset="$2"; shift 2 ;;
    --layers) layers="$2"; shift 2 ;;
    --latent) latent="$2"; shift 2 ;;
    --tokens) tokens="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --hidream) hidream="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    *) echo "gpu-check: unknown argument $1" >&2; usage ;;
  esac
done
[ "$preset" = full ] || [ "$layers" != 8,8 ] || layers=""   # --layers 8,8 is the full preset's default
if [ -z "$hidream" ]; then
  for candidate in .gpu/hidream target/cuda/gpu/hidream target/release/hidream; do
    [ -x "$candidate" ] && { hidream="$candidate"; break; }
  done
fi
[ -n "$hidream" ] && [ -x "$hidream" ] || { echo "gpu-check: no hidream binary; pass --hidream PATH" >&2; exit 1; }
work="${work:-${TMPDIR:-/tmp}/hidream-gpu-check}"
mkdir -p "$out/runs" "$work"
log="$out/gpu-check.log"
: > "$log"
say() { echo "[$(( $(date +%s) - started )) s] $*" | tee -a "$log"; }

case "$device" in
  cpu) dtype=f32 ;;
  cuda*) dtype=bf16 ;;
  *) echo "gpu-check: --device is cpu, cuda or cuda:N" >&2; exit 2 ;;
esac

# 1. The machine.
{
  echo "date: $(date -u '+%F %T UTC')"
  echo "command: scripts/gpu-check.sh $out --device $device --preset $preset ${layers:+--layers $layers} --latent $latent --tokens $tokens --steps $steps"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "host: $(uname -srm), $(nproc) CPUs, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
  echo "cpu: $(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)"
} > "$out/machine.txt"
if [ "$dtype" = bf16 ]; then
  # The GPU machine's PyTorch ships the CUDA 13 libraries the binary links (see docs/cuda.md).
  nvlib="$(python3 -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))' 2>/dev/null || true)"
  cudalib="$(dirname "$(find / -name libcuda.so.1 2>/dev/null | head -1)" 2>/dev/null || true)"
  export LD_LIBRARY_PATH="${nvlib:+$nvlib:}${cudalib:+$cudalib:}${LD_LIBRARY_PATH:-}"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,pcie.link.gen.current,pcie.link.width.current,clocks.max.sm \
      --format=csv >> "$out/machine.txt" 2>&1 || true
  fi
fi
ldd "$hidream" > "$out/ldd.txt" 2>&1 || true
if grep -q 'not found' "$out/ldd.txt"; then
  say "the binary is missing libraries:"; grep 'not found' "$out/ldd.txt" | tee -a "$log"; exit 1
fi
say "machine: $(tr '\n' ' ' < "$out/machine.txt")"

# 2. Bandwidth of the staged upload path.
if [ "$dtype" = bf16 ]; then bw_bytes=4GiB; else bw_bytes=1GiB; fi
"$hidream" bandwidth --device "$device" --bytes "$bw_bytes" --buffer 1GiB --repeat 3 --json > "$out/bandwidth.json"
say "bandwidth: $(cat "$out/bandwidth.json")"

# 3. The checkpoint and the inputs.
model="$work/model-$preset${layers:+-${layers/,/-}}"
synth=(synth --preset "$preset" ${layers:+--layers "$layers"})
if [ ! -f "$model/config.json" ]; then
  say "synthesising $preset ${layers:+(layers $layers) }in bf16 into $model"
  "$hidream" "${synth[@]}" --dtype bf16 --out "$model" >> "$log" 2>&1
fi
inputs="$work/inputs-$latent-$tokens.safetensors"
"$hidream" "${synth[@]}" --latent "$latent" --t5-tokens "$tokens" --llama-tokens "$tokens" --inputs "$inputs" >> "$log" 2>&1
du -sb "$model" | awk '{print "checkpoint_bytes_on_disk: " $1}' >> "$out/machine.txt"

# The budgets, scaled to the slice: the same share of its weights as B GiB is of the whole model's.
plan_json() { "$hidream" plan "$@" --dtype "$dtype" --json; }
"$hidream" plan --preset full --dtype bf16 --json > "$out/plan-full-model.json"   # the shares are of the bf16 model
plan_json --model "$model" > "$out/plan-all.json"
full_bytes=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["config"]["weight_bytes"])' "$out/plan-full-model.json")
slice_bytes=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["config"]["weight_bytes"])' "$out/plan-all.json")
min_budget=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["settings"]["per_prompt"]["minimum_budget"])' "$out/plan-all.json")
: > "$out/floored.txt"
bandwidth=$(python3 -c 'import json,sys;print(int(json.load(open(sys.argv[1]))["best_bandwidth_bytes_per_s"]))' "$out/bandwidth.json")
pixels=$(python3 -c 'import sys;w,h=sys.argv[1].split("x");print(f"{int(w)*8}x{int(h)*8}")' "$latent")

# 4. The runs. `all` first: it is the reference for bit-identity and for the compute time.
runs=(all stream budget-24 budget-8 budget-3)
for run in "${runs[@]}"; do
  flags=()
  case "$run" in
    all) flags=(--residency all) ;;
    stream) flags=(--residency stream) ;;
    budget-*)
      gib=${run#budget-}
      # A slice keeps the full model's widest units, so its smallest working budget does not shrink
      # with its share: a scaled budget below it is raised to it, and the report says so.
      bytes=$(python3 -c 'import sys;g,f,s,m=map(int,sys.argv[1:]);print(max(m,min(s,g*2**30*s//f)))' \
        "$gib" "$full_bytes" "$slice_bytes" "$min_budget")
      [ "$bytes" = "$min_budget" ] && echo "$run" >> "$out/floored.txt"
      flags=(--budget "$bytes")
      plan_json --model "$model" --budget "$bytes" --size "$pixels" --variant dev --bandwidth "$bandwidth" \
        > "$out/plan-$run.json" 2>> "$log" || true
      ;;
  esac
  [ "$run" = all ] && plan_json --model "$model" --size "$pixels" --variant dev --bandwidth "$bandwidth" > "$out/plan-all.json"
  compare=()
  [ "$run" != all ] && compare=(--compare-to "$out/runs/all.safetensors")
  say "run $run: ${flags[*]}"
  if ! "$hidream" denoise --device "$device" --dtype "$dtype" --steps "$steps" --model "$model" --inputs "$inputs" \
      --out "$out/runs/$run.safetensors" --report "$out/runs/$run.json" "${flags[@]}" "${compare[@]}" >> "$log" 2>&1; then
    say "run $run failed (see its report, if any, and $log)"
    [ "$run" = all ] && exit 1
  fi
done

# 5. Exactness: the tiny golden transformer in the device's dtype against diffusers' f32 output.
golden=tests/golden/transformer
"$hidream" forward --device "$device" --dtype bf16 --model "$golden/models/tiny" \
  --inputs "$golden/cases/nonsquare_b2/inputs.safetensors" --out "$out/golden-bf16.safetensors" \
  --compare-to "$golden/cases/nonsquare_b2/expected.safetensors" --report "$out/golden-bf16.json" >> "$log" 2>&1

# 6. The report.
python3 - "$out" "$device" "$preset" "$layers" "$latent" "$tokens" "$steps" "$started" "${runs[@]}" <<'PY'
import json, sys, time, pathlib
out, device, preset, layers, latent, tokens, steps, started, *runs = sys.argv[1:]
out = pathlib.Path(out)
load = lambda name: json.loads((out / name).read_text()) if (out / name).exists() else None
GiB = 2**30
bandwidth = load("bandwidth.json")
bw = bandwidth["best_bandwidth_bytes_per_s"]
full, sliced = load("plan-full-model.json")["config"], load("plan-all.json")["config"]
reports = {run: load(f"runs/{run}.json") for run in runs}
floored = set((out / "floored.txt").read_text().split())
all_report = reports["all"]
compute_s = all_report["seconds_per_step"]

def predicted(run):
    plan = load("plan-all.json" if run == "all" else f"plan-{run}.json")
    if plan is None or run == "stream":
        return None
    setting = plan["settings"]["per_prompt"]
    if setting.get("plan") is None:
        return {"error": setting.get("error")}
    return {
        "peak_weight_bytes": setting["plan"]["peak_weight_bytes"],
        "peak_device_bytes": setting["device_estimate"]["total_bytes"],
        "streamed_bytes_per_step": setting["plan"]["streamed_bytes_per_step"],
        "s_per_step": setting["time"]["s_per_step"],
    }

rows = []
for run in runs:
    r = reports[run]
    if r is None or "seconds_per_step" not in r:
        rows.append({"run": run, "ran": False, "report": r, "predicted": predicted(run)})
        continue
    n = max(r["steps"], 1)
    streamed = r["bytes_streamed"] / n
    bound = max(compute_s, streamed / bw)
    gpu = r.get("gpu") or {}
    rows.append({
        "run": run, "ran": True,
        "budget_bytes": r["budget_bytes"],
        "budget_floored_to_minimum": run in floored,
        "peak_device_bytes_measured": r["peak_device_bytes"],
        "driver_used_max_bytes": gpu.get("driver_used_max_bytes"),
        "peak_weight_bytes_ledger": r["peak_weight_bytes"],
        "activation_peak_bytes": r["forward_heap_peak_delta_bytes"],
        "prepared_bytes": r.get("prepared_bytes"),
        "seconds_per_step": r["seconds_per_step"],
        "stall_seconds_per_step": r["stall_seconds"] / n,
        "bytes_streamed_per_step": streamed,
        "lower_bound_seconds_per_step": bound,
        "ratio_to_lower_bound": r["seconds_per_step"] / bound if bound > 0 else None,
        "bit_identical_to_all": True if run == "all" else r.get("bit_identical"),
        "max_abs_diff_to_all": 0.0 if run == "all" else r.get("max_abs_diff"),
        "predicted": predicted(run),
    })

golden = load("golden-bf16.json")
bound = max(2 * golden["reference_bf16_drift"], 2e-2 * golden["reference_scale"])
exactness = {
    "case": "tests/golden/transformer nonsquare_b2, bf16 on the device against diffusers' f32 on the CPU",
    "max_abs_diff": golden["max_abs_diff"], "bound": bound, "within_bound": golden["max_abs_diff"] <= bound,
}
report = {
    "machine": (out / "machine.txt").read_text(),
    "device": device, "preset": preset, "layers": layers or None, "latent": latent,
    "text_tokens": [int(tokens), int(tokens)], "steps": int(steps),
    "weight_bytes": {"slice": sliced["weight_bytes"], "full_model": full["weight_bytes"]},
    "bandwidth": bandwidth, "runs": rows, "exactness": exactness,
    "check_seconds": time.time() - int(started),
}
(out / "gpu-report.json").write_text(json.dumps(report, indent=2))

fmt = lambda b: "—" if b is None else f"{b / GiB:.2f} GiB"
sec = lambda s: "—" if s is None else f"{s:.3f}"
lines = [
    f"# GPU check: {device}, preset {preset}{' sliced to ' + layers if layers else ''}",
    "", "```", report["machine"].strip(), "```", "",
    f"Latent {latent} ({int(latent.split('x')[0]) * int(latent.split('x')[1]) // 4} image tokens), "
    f"{tokens} + {tokens} text tokens, {steps} steps of `hidream denoise`, each with the precomputation. "
    f"Weights: {fmt(sliced['weight_bytes'])} of the whole model's {fmt(full['weight_bytes'])}; budgets are "
    f"scaled by that share. Staged upload bandwidth: {bw / 1e9:.2f} GB/s (best of {len(bandwidth['seconds'])}).",
    "",
    "| run | budget | peak measured | ledger | activations | predicted peak | s/step | stall/step | streamed/step | lower bound | × bound | identical to all |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]
for row in rows:
    if not row["ran"]:
        reason = (row["report"] or {}).get("error") or "failed: see gpu-check.log"
        lines.append(f"| {row['run']} | | {reason} | | | | | | | | | |")
        continue
    p = row["predicted"] or {}
    lines.append(
        f"| {row['run']} | {fmt(row['budget_bytes'])}{' (min)' if row['budget_floored_to_minimum'] else ''} | {fmt(row['peak_device_bytes_measured'])} "
        f"| {fmt(row['peak_weight_bytes_ledger'])} | {fmt(row['activation_peak_bytes'])} "
        f"| {fmt(p.get('peak_device_bytes'))} | {sec(row['seconds_per_step'])} | {sec(row['stall_seconds_per_step'])} "
        f"| {fmt(row['bytes_streamed_per_step'])} | {sec(row['lower_bound_seconds_per_step'])} "
        f"| {row['ratio_to_lower_bound']:.2f} | {row['bit_identical_to_all']} |")
lines += [
    "",
    f"- *peak measured*: {'the GPU memory pool high-water mark' if device != 'cpu' else 'the process heap peak'}; "
    "*ledger*: the budget ledger's peak of weight bytes; *activations*: the largest growth within one step.",
    "- *(min)*: the share-scaled budget was below the slice's smallest working budget "
    "(`hidream plan`'s minimum_budget), so the run used that minimum.",
    "- *lower bound*: max(s/step of `all`, streamed bytes per step / the bandwidth above).",
    f"- Exactness: {exactness['case']}: max |diff| {exactness['max_abs_diff']:.4g}, bound {bound:.4g}: "
    f"{'within' if exactness['within_bound'] else 'OUTSIDE'} the bound.",
    f"- The check took {report['check_seconds']:.0f} s.",
]
(out / "gpu-report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
failed = [row["run"] for row in rows if row["ran"] and row["bit_identical_to_all"] is not True]
if failed or not exactness["within_bound"]:
    sys.exit(f"gpu-check: outputs differ from `all` ({failed}) or the golden check is outside its bound")
PY
say "wrote $out/gpu-report.json and $out/gpu-report.md"
