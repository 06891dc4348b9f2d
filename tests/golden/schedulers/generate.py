"""Golden fixtures for the two official HiDream-I1 samplers.

How to run (from the repository root):

    ~/refenv/bin/pip install --no-deps hdi1==1.0.4
    ~/refenv/bin/python tests/golden/schedulers/generate.py

It was run with Python 3.11, torch 2.15.0 (CPU), numpy 2.4.6, diffusers 0.42.1, safetensors 0.8.0 and
hdi1 1.0.4. CI never runs this script: its outputs (`cases.json` and one `<case>.safetensors` per case,
about 240 KB in all) are committed, and the Rust test `golden.rs` only reads them. Rerunning it rewrites
them from fixed seeds; on the same versions the output is bit-identical. It takes a few seconds.

The reference
-------------
`hdi1` (github.com/hykilpikonna/HiDream-I1-nf4) is the PyPI packaging of the official HiDream-I1
code (github.com/HiDream-ai/HiDream-I1, `hi_diffusers/`), plus 4-bit model loading. Its schedulers are loaded straight from their files,
`hdi1/schedulers/fm_solvers_unipc.py` (`FlowUniPCMultistepScheduler`) and
`hdi1/schedulers/flash_flow_match.py` (`FlashFlowMatchEulerDiscreteScheduler`), so that the package
`__init__` (which imports the transformer, einops and flash_attn) never runs. The two files import only
numpy, torch and diffusers.

Each case is driven exactly as `hdi1/pipelines/hidream_image/pipeline_hidream_image.py` (`__call__`,
step 5 "Prepare timesteps" and the denoising loop) drives the scheduler:

* the scheduler is constructed as `hdi1/nf4.py` (`MODEL_CONFIGS`, `load_models`) does:
  `cls(num_train_timesteps=1000, shift=<variant shift>, use_dynamic_shifting=False)`;
* `mu = calculate_shift(transformer.max_seq)` (max_seq 4096 for the released transformer, whose
  `max_resolution` is 128x128 with patch size 2), and then
  - FlowUniPC: `set_timesteps(n, shift=math.exp(mu))`: the pipeline's extra shift, exp(1.15) = 3.158...,
    which replaces the configured shift 3.0 in `set_timesteps` (3.0 still shapes `sigma_max` in `__init__`);
  - FlashFlowMatchEuler: `set_timesteps(n, mu=mu)` through `retrieve_timesteps`; `mu` is ignored unless
    `use_dynamic_shifting` is set (only the extra case `flash_dynamic_8` sets it);
* `step(model_output, t, latents)` for each `t` in `scheduler.timesteps`, where `model_output` plays the
  role of the pipeline's `noise_pred` (already negated and guided).

Inputs are pseudo-random and fixed: `torch.manual_seed(case seed)`, then the initial sample
`randn(shape)`, a target `x0 = randn(shape)`, and per step a "model output"
`(sample - x0) / max(sigma_i, 0.05) + 0.5 * randn(shape)`: an imperfect velocity, so that the samples stay
O(1) and every step matters. FlashFlowMatchEuler re-noises with `randn_tensor(shape, generator)`: the
script passes a `torch.Generator` seeded with `seed + 1` and records the exact noise each step draws (it
draws the same numbers from a saved generator state first). The last step draws none.

Outputs
-------
cases.json   a list of cases: name, scheduler config as `save_config` writes it (`_class_name` and every
             `__init__` argument), `n_steps`, `image_max_seq` (the transformer's max_seq), `mu`, the
             `variant` the case mirrors (or null), dtype, shape, seed, note.
<case>.safetensors
    sigmas          [n + 1]  float32, `scheduler.sigmas` after `set_timesteps`
    timesteps       [n]      float32, what the transformer receives (UniPC's int64 timesteps as floats)
    sample_in       [shape]  the initial sample (dtype of the case)
    model_outputs   [n, ...] the model output fed to each step (dtype of the case)
    noise           [n-1, ...] float32, FlashFlowMatchEuler only: the noise step i drew (i < n - 1)
    samples         [n, ...] the sample `step` returned at each step (dtype of the case)
    samples_exact_scalars  [n, ...] FlowUniPC only: the same run with torch's float32 `log`, `expm1` and
                    `linalg.solve` (MKL VML and LAPACK on CPU, within an ulp or two) replaced by their
                    correctly rounded values (evaluated in float64, rounded to float32). Everything else
                    in both schedulers is IEEE arithmetic, so a faithful port reproduces these (and, for
                    FlashFlowMatchEuler, `samples`) bit for bit.

bfloat16 cases run the schedulers on bfloat16 samples and model outputs, as the official pipeline does
(its latents take the text embeddings' dtype).
"""

import json
import math
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import golden_util  # noqa: E402  (tests/golden/golden_util.py)

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = [2, 4, 4, 4]
IMAGE_MAX_SEQ = 128 * 128 // (2 * 2)

UniPC = golden_util.hdi1_scheduler_module("fm_solvers_unipc").FlowUniPCMultistepScheduler
Flash = golden_util.hdi1_scheduler_module("flash_flow_match").FlashFlowMatchEulerDiscreteScheduler


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    # hdi1/pipelines/hidream_image/pipeline_hidream_image.py, `calculate_shift` (copied from Flux).
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


# name, class, constructor kwargs, n_steps, variant, dtype, seed, note
CASES = [
    ("full_50", UniPC, dict(shift=3.0), 50, "full", "f32", 1, "Full: FlowUniPC, 50 steps"),
    ("full_6", UniPC, dict(shift=3.0), 6, "full", "f32", 2, "Full's scheduler, a short schedule"),
    ("full_2", UniPC, dict(shift=3.0), 2, "full", "f32", 3, "2 steps: order 1 then lower_order_final"),
    ("full_1", UniPC, dict(shift=3.0), 1, "full", "f32", 4, "1 step: one first-order predictor step"),
    ("dev_28", Flash, dict(shift=6.0), 28, "dev", "f32", 5, "Dev: FlashFlowMatchEuler shift 6, 28 steps"),
    ("fast_16", Flash, dict(shift=3.0), 16, "fast", "f32", 6, "Fast: FlashFlowMatchEuler shift 3, 16 steps"),
    ("fast_1", Flash, dict(shift=3.0), 1, "fast", "f32", 7, "1 step: the last step returns its input"),
    ("full_6_bf16", UniPC, dict(shift=3.0), 6, "full", "bf16", 8, "Full's scheduler on bfloat16 tensors"),
    ("fast_16_bf16", Flash, dict(shift=3.0), 16, "fast", "bf16", 9, "Fast's scheduler on bfloat16 tensors"),
    ("unipc_order3_10", UniPC, dict(shift=3.0, solver_order=3), 10, None, "f32", 10, "solver_order 3"),
    (
        "unipc_bh1_noise_pred_8",
        UniPC,
        dict(shift=2.0, predict_x0=False, solver_type="bh1", disable_corrector=[0, 2]),
        8,
        None,
        "f32",
        11,
        "predict_x0 false, bh1, corrector disabled after steps 0 and 2; the last step is NaN: "
        "sigma_t * expm1(h) * m0 = 0 * inf",
    ),
    (
        "unipc_no_lower_order_final_5",
        UniPC,
        dict(shift=3.0, lower_order_final=False),
        5,
        None,
        "f32",
        12,
        "lower_order_final false: the last second-order step divides by rk = -0 and is not finite",
    ),
    ("flash_dynamic_8", Flash, dict(shift=3.0, use_dynamic_shifting=True), 8, None, "f32", 13, "use_dynamic_shifting"),
]

NON_FINITE_LAST = {"unipc_bh1_noise_pred_8", "unipc_no_lower_order_final_5"}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def make_scheduler(cls, kwargs, n_steps, mu):
    scheduler = cls(num_train_timesteps=1000, **{"use_dynamic_shifting": False, **kwargs})
    if cls is UniPC:
        scheduler.set_timesteps(n_steps, shift=math.exp(mu))
    else:
        scheduler.set_timesteps(n_steps, mu=mu)
    return scheduler


class CorrectlyRoundedScalars:
    """Within the block, float32 `torch.log`, `torch.expm1` and `torch.linalg.solve` are evaluated in
    float64 and rounded to float32."""

    def __enter__(self):
        self.saved = torch.log, torch.expm1, torch.linalg.solve
        log, expm1, solve = self.saved

        def in_f64(fn):
            return lambda x: fn(x.double()).float() if x.dtype == torch.float32 else fn(x)

        torch.log, torch.expm1 = in_f64(log), in_f64(expm1)
        torch.linalg.solve = lambda a, b: solve(a.double(), b.double()).float()

    def __exit__(self, *exc):
        torch.log, torch.expm1, torch.linalg.solve = self.saved


def replay_unipc(cls, kwargs, n_steps, mu, sample, model_outputs):
    scheduler = make_scheduler(cls, kwargs, n_steps, mu)
    samples = []
    for t, model_output in zip(scheduler.timesteps, model_outputs):
        sample = scheduler.step(model_output, t, sample, return_dict=False)[0]
        samples.append(sample)
    return torch.stack(samples)


def run_case(name, cls, kwargs, n_steps, variant, dtype_name, seed, note):
    dtype = DTYPES[dtype_name]
    mu = calculate_shift(IMAGE_MAX_SEQ)
    scheduler = make_scheduler(cls, kwargs, n_steps, mu)
    with tempfile.TemporaryDirectory() as tmp:
        scheduler.save_config(tmp)
        with open(os.path.join(tmp, "scheduler_config.json")) as f:
            config = json.load(f)

    torch.manual_seed(seed)
    sample = torch.randn(SHAPE).to(dtype)
    x0 = torch.randn(SHAPE)
    generator = torch.Generator().manual_seed(seed + 1)
    tensors = {
        "sigmas": scheduler.sigmas.clone().float(),
        "timesteps": scheduler.timesteps.clone().float(),
        "sample_in": sample.clone(),
    }
    model_outputs, noises, samples = [], [], []
    for i, t in enumerate(scheduler.timesteps):
        sigma = max(float(scheduler.sigmas[i]), 0.05)
        model_output = ((sample.float() - x0) / sigma + 0.5 * torch.randn(SHAPE)).to(dtype)
        model_outputs.append(model_output.clone())
        if cls is Flash:
            if i < n_steps - 1:
                state = generator.get_state()
                noises.append(torch.randn(SHAPE, generator=generator, dtype=torch.float32))
                generator.set_state(state)
            sample = scheduler.step(model_output, t, sample, generator=generator, return_dict=False)[0]
        else:
            sample = scheduler.step(model_output, t, sample, return_dict=False)[0]
        assert sample.dtype == dtype, (name, sample.dtype)
        samples.append(sample.clone())
    if cls is Flash:
        # The recorded noise is what `step` drew: the generator has advanced by exactly those draws.
        check = torch.Generator().manual_seed(seed + 1)
        for noise in noises:
            assert torch.equal(noise, torch.randn(SHAPE, generator=check, dtype=torch.float32))
        assert torch.equal(generator.get_state(), check.get_state())
        tensors["noise"] = torch.stack(noises) if noises else torch.zeros([0] + SHAPE)
    tensors["model_outputs"] = torch.stack(model_outputs)
    tensors["samples"] = torch.stack(samples)
    if cls is UniPC:
        # The replay reproduces the recorded run exactly, then runs again with correctly rounded scalars.
        assert torch.equal(replay_unipc(cls, kwargs, n_steps, mu, tensors["sample_in"], model_outputs).float()
                           .nan_to_num(), tensors["samples"].float().nan_to_num())
        with CorrectlyRoundedScalars():
            exact = replay_unipc(cls, kwargs, n_steps, mu, tensors["sample_in"], model_outputs)
        tensors["samples_exact_scalars"] = exact
    # Two reference configurations break down on their last step (final sigma 0): the script asserts it.
    if name in NON_FINITE_LAST:
        assert torch.isfinite(tensors["samples"][:-1].float()).all() and not torch.isfinite(samples[-1]).all()
    else:
        assert all(torch.isfinite(s.float()).all() for s in samples), name
    golden_util.save_tensors(tensors, os.path.join(HERE, name + ".safetensors"))
    return {
        "name": name,
        "note": note,
        "variant": variant,
        "n_steps": n_steps,
        "image_max_seq": IMAGE_MAX_SEQ,
        "mu": mu,
        "dtype": dtype_name,
        "shape": SHAPE,
        "seed": seed,
        "config": config,
    }


def main():
    cases = [run_case(*case) for case in CASES]
    golden_util.write_json(os.path.join(HERE, "cases.json"), cases, indent=1)
    total = sum(os.path.getsize(os.path.join(HERE, c["name"] + ".safetensors")) for c in cases)
    print(f"wrote {len(cases)} cases, {total / 1024:.0f} KiB of safetensors")


if __name__ == "__main__":
    main()
