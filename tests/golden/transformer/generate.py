"""Golden fixtures for the HiDream-I1 transformer (diffusers' `HiDreamImageTransformer2DModel`).

How to run (from the repository root):

    ~/refenv/bin/python tests/golden/transformer/generate.py

It was run with Python 3.11, torch 2.15.0 (CPU, float32), diffusers 0.42.1, safetensors 0.8.0
(transformers 5.24.0, accelerate 1.15.0 installed alongside). CI never runs this script: its
outputs are committed, and the Rust tests only read them. Rerunning it rewrites everything under
`tests/golden/transformer/{models,cases}/` from fixed seeds (`torch.manual_seed` per model and
per case); on the same versions the output is bit-identical. It takes a few seconds on CPU.

Weights
-------
Each model is constructed under `torch.manual_seed(seed)` (nn.Linear defaults: kaiming-uniform
weights, uniform biases; MoEGate weights randn/sqrt(dim)), then the q/k RMSNorm weights (ones by
default) are set to 1 + 0.1*randn, and every adaLN_modulation linear (weight and bias) is scaled by
ADALN_SCALE = 4 so that shift/scale/gate values are ~0.4 rather than ~0.1 and every block matters.
The script checks that no parameter is constant, and that resetting any single parameter tensor to
its trivial value (ones for RMSNorm weights, zeros otherwise) moves `sample` by more than 1e-5 in at
least one case of its model (in practice >= 2e-3): every tensor, every routed expert included,
matters numerically. It also checks that each case computed in float64 agrees with float32 to
~1e-6 and that no token's k-th and (k+1)-th gate scores are within MIN_MARGIN of a tie.

diffusers behaviour these fixtures pin down (0.42.1, `transformer_hidream_image.py`)
-----------------------------------------------------------------------------------
* Non-square latents (H != W, and only then) are padded to max_seq = max_res[0]*max_res[1]/p^2
  tokens; padded rows are zero patches (so x_embedder gives its bias) with position ids (0,0,0).
  The "mask" multiplies the image KEYS by 0/1 (before RoPE); it is not an additive -inf mask, so
  each padded token still gets softmax weight exp(0 - max) and its value leaks into every query.
  The output therefore depends on max_seq (tiny, 8x12 latent: max_seq 64 -> 80 moves `sample`
  by 0.13). Square latents are never padded or masked, whatever their size.
* RoPE: ids are float32 (axis 0 always 0, axis 1 row, axis 2 column; text ids all 0); the table is
  computed in float64 on CPU/CUDA (float32 on mps/npu/neuron) and then `.float()`. Pairs are
  interleaved (x[2j], x[2j+1]); q and k are rotated after image and text are concatenated.
* q/k RMSNorm (eps 1e-5) is over the whole inner dim, before the split into heads. LayerNorms
  have eps 1e-6 and no affine parameters.
* Every SwiGLU hidden width is rounded up to a multiple of 256: in tiny/tiny_e3 the routed
  experts, the shared expert and ff_t are all 256 wide.
* MoE (eval mode): top-k of the softmax over ALL routed experts, weights not renormalised, plus
  the shared expert, always. `model.eval()` matters: a freshly constructed model is in training
  mode, which takes another MoE path and another unpatchify.
* caption_projection holds num_layers+num_single_layers Llama projections, then the T5 one
  (last), although caption_channels is [t5, llama]. Block i reads llama layer llama_layers[i]
  through caption_projection[i]. The initial text stream is cat(T5, projection of the LAST block's
  Llama layer); block i appends its own Llama tokens and drops them again after the block.
* Timestep embedding: 256 channels, [cos, sin] order (flip_sin_to_cos), frequencies
  exp(-ln(10000) * j / 128), computed in float32.

Outputs
-------
models/tiny/      the "tiny" model (mirrors `TransformerConfig::tiny()`), float32, written by
                  `save_pretrained(..., max_shard_size="1MB")`: `config.json`,
                  `diffusion_pytorch_model.safetensors.index.json` and 3 shards
                  `diffusion_pytorch_model-0000N-of-00003.safetensors`.
models/tiny_e3/   the "tiny_e3" model (3 routed experts, 1 double + 3 single blocks, non-square
                  `max_resolution` [12, 16], `llama_layers` [1, 1, 0, 2]), stored in bfloat16 as one
                  `diffusion_pytorch_model.safetensors`. Its expected outputs are computed in float32
                  on those bf16-rounded weights (loaded back from disk and upcast), so a Rust port that
                  loads the bf16 file and computes in f32 must match to f32 precision.
cases/<case>/     case.json          {"model": ..., "note": ..., "seed": ...}
                  inputs.safetensors   float32, contiguous, under diffusers' forward argument names:
                    hidden_states                 [B, C, H, W]
                    timesteps                     [B]   (float, fractional on purpose in some cases)
                    encoder_hidden_states_t5      [B, 8, caption_channels[0]]      (S_t5 = 8)
                    encoder_hidden_states_llama3  [max(llama_layers)+1, B, 6, caption_channels[1]]
                                                                                    (S_llama = 6)
                    pooled_embeds                 [B, text_emb_dim]
                  expected.safetensors   `sample` [B, C, H, W] float32 =
                    model(**inputs, return_dict=False)[0] under torch.no_grad(), model.eval();
                    `sample_bf16`: the same forward with the model and inputs cast to bfloat16
                    (timesteps stay f32), upcast to f32 - the reference's own bf16 drift.
                  intermediates.safetensors   debugging aids, float32 unless said, for SAMPLE 0 ONLY
                    (the batch dimension is kept, with size 1). N = image tokens: H/2*W/2 for a
                    square latent, `max_seq` = max_resolution[0]*max_resolution[1]/4 for a non-square
                    one (diffusers pads to max_seq). T = S_t5 + S_llama (text tokens carried by the
                    double blocks); D = 32 (inner dim).
                    x_embedder.input   [1, N, 16]  patchified latent (features ordered (ph, pw, c);
                                                   zero rows for the padding of a non-square latent)
                    x_embedder         [1, N, D]   output of x_embedder (its bias on padded rows)
                    mask               [1, N]      hidden_states_masks (only non-square cases): 1 on the
                                                   H/2*W/2 real tokens, 0 on padding
                    single_mask        [1, N+T+S_llama]  the mask the single blocks get (mask + ones)
                    t_embedder         [1, D]      timestep embedding (after TimestepEmbedding)
                    p_embedder         [1, D]      pooled-text embedding
                    temb               [1, D]      t_embedder + p_embedder (what every adaLN reads)
                    rope               [1, N+T+S_llama, 1, 8, 2, 2]  pe_embedder output (rope table:
                                                   [[cos, -sin], [sin, cos]] per pair of head dims;
                                                   text ids are all zero, so text rows are identity)
                    caption.llama.<i>  [1, 6, D]   caption_projection[i] applied to llama layer
                                                   llama_layers[i], i = block index (double then single)
                    caption.t5         [1, 8, D]   caption_projection[-1] applied to the T5 states
                    double.<i>.text_in [1, T+S_llama, D]  text stream fed to double block i:
                                                   cat(first T tokens of double.<i-1>.text, caption.llama.<i>);
                                                   for i = 0: cat(caption.t5, caption.llama.<last>,
                                                   caption.llama.0)
                    double.<i>.attn.image / .attn.text   attention outputs (after to_out / to_out_t),
                                                   before the gate
                    double.<i>.ff_i    [1, N, D]   MoE feed-forward output (before gate_mlp_i)
                    double.<i>.ff_t    [1, T+S_llama, D]  text feed-forward output (before gate_mlp_t)
                    double.<i>.gate.idx    int64 [1, N, k]  routed experts per token, sorted ascending
                    double.<i>.gate.weight [1, N, k]  their softmax scores (not renormalised)
                    double.<i>.image   [1, N, D]   image hidden_states after double block i
                    double.<i>.text    [1, T+S_llama, D]  text stream after double block i (the model
                                                   keeps only its first T tokens for the next block)
                    single.<i>.in      [1, N+T+S_llama, D]  input of single block i: cat(image, T text
                                                   tokens, caption.llama.<num_layers+i>)
                    single.<i>.attn / .ff_i / .gate.idx / .gate.weight   as for the double blocks
                    single.<i>         [1, N+T+S_llama, D]  output of single block i (the model keeps
                                                   its first N+T tokens)
                    final_layer        [1, N, 16]  final_layer output (before unpatchify)

Also: `--check-rust-synth DIR` loads a checkpoint written by `hidream synth --preset tiny --out
DIR` with `from_pretrained`, checks it key for key against the raw safetensors, runs diffusers on
fixed random inputs and writes `DIR/diffusers_check.safetensors` (see `check_rust_synthetic`).
"""

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

import diffusers
from diffusers import HiDreamImageTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import golden_util  # noqa: E402  (tests/golden/golden_util.py)

HERE = Path(__file__).resolve().parent
MODELS_DIR = HERE / "models"
CASES_DIR = HERE / "cases"

S_T5 = 8
S_LLAMA = 6
# Smallest allowed gap between the k-th and (k+1)-th gate score of any token, so that a faithful f32
# port cannot route a token differently (case seeds were picked to satisfy it; e.g. seed 5 for
# e3_square put a token within 7e-5 of a tie).
MIN_MARGIN = 2e-4
ADALN_SCALE = 4.0

TINY = dict(
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    caption_channels=[32, 24],  # [t5, llama]: different widths on purpose
    text_emb_dim=16,
    num_routed_experts=4,
    num_activated_experts=2,
    axes_dims_rope=[4, 6, 6],
    max_resolution=[16, 16],
    llama_layers=[2, 0, 2, 2],  # repeats on purpose
)

TINY_E3 = dict(
    TINY,
    num_routed_experts=3,
    num_activated_experts=2,
    llama_layers=[1, 1, 0, 2],
    max_resolution=[12, 16],  # non-square: max_seq = 12*16/4 = 48
    num_layers=1,
    num_single_layers=3,
)

MODELS = {
    # name: (config, seed, bf16 storage)
    "tiny": (TINY, 20250101, False),
    "tiny_e3": (TINY_E3, 20250202, True),
}

CASES = [
    dict(
        name="square_b1",
        model="tiny",
        seed=1,
        latent=(1, 4, 8, 8),
        timesteps=[700.0],
        note="square latent, no padding/mask: 16 image tokens",
    ),
    dict(
        name="nonsquare_b1",
        model="tiny",
        seed=2,
        latent=(1, 4, 8, 12),
        timesteps=[700.0],
        note="H != W: 4x6 = 24 real patches padded to max_seq = 64, key mask on padding",
    ),
    dict(
        name="square_b2",
        model="tiny",
        seed=3,
        latent=(2, 4, 8, 8),
        timesteps=[937.5, 112.25],
        note="batch 2, different timesteps and inputs per sample",
    ),
    dict(
        name="nonsquare_b2",
        model="tiny",
        seed=4,
        latent=(2, 4, 12, 6),
        timesteps=[937.5, 112.25],
        note="batch 2, H > W: 6x3 = 18 real patches padded to max_seq = 64",
    ),
    dict(
        name="e3_square",
        model="tiny_e3",
        seed=7,
        latent=(1, 4, 8, 8),
        timesteps=[250.0],
        note="3 routed experts (top-2), bf16-stored weights computed in f32",
    ),
    dict(
        name="e3_nonsquare_b2",
        model="tiny_e3",
        seed=6,
        latent=(2, 4, 10, 6),
        timesteps=[500.0, 31.25],
        note="3 routed experts, batch 2, H != W: 5x3 = 15 real patches padded to max_seq = 48 "
        "(non-square max_resolution [12, 16])",
    ),
]


# --------------------------------------------------------------------------------------------
# Models


def save_model(name):
    config, seed, bf16 = MODELS[name]
    model = golden_util.build_hidream_transformer(config, seed, ADALN_SCALE)
    out = golden_util.reset_dir(MODELS_DIR / name)
    if bf16:
        model = model.to(torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True, max_shard_size="100MB")
        reference = model.to(torch.float32)  # exact upcast of the bf16-rounded weights
    else:
        model.save_pretrained(out, safe_serialization=True, max_shard_size="1MB")
        reference = model
    # The expected outputs are computed with the checkpoint as loaded back from disk.
    loaded, info = HiDreamImageTransformer2DModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in info), info
    loaded = loaded.to(torch.float32).eval()
    ref_sd = reference.state_dict()
    loaded_sd = loaded.state_dict()
    assert ref_sd.keys() == loaded_sd.keys()
    for key in ref_sd:
        assert torch.equal(ref_sd[key], loaded_sd[key]), key
    for p in loaded.parameters():
        assert p.dtype == torch.float32
    return loaded


# --------------------------------------------------------------------------------------------
# Inputs and intermediates


def make_inputs(config, latent, timesteps, seed):
    torch.manual_seed(seed)
    b = latent[0]
    n_llama = max(config["llama_layers"]) + 1
    t5_dim, llama_dim = config["caption_channels"]
    inputs = {
        "hidden_states": torch.randn(*latent),
        "timesteps": torch.tensor(timesteps, dtype=torch.float32),
        "encoder_hidden_states_t5": torch.randn(b, S_T5, t5_dim),
        "encoder_hidden_states_llama3": torch.randn(n_llama, b, S_LLAMA, llama_dim),
        "pooled_embeds": torch.randn(b, config["text_emb_dim"]),
    }
    assert inputs["timesteps"].shape == (b,)
    return {k: v.float().contiguous() for k, v in inputs.items()}


class Recorder:
    """Forward hooks that keep sample 0 of the intermediates listed in the module docstring, and
    the smallest top-k routing margin (k-th minus (k+1)-th softmax score) over all tokens."""

    def __init__(self, model):
        self.model = model
        self.out = {}
        self.min_margin = math.inf
        self.handles = []
        self.k = model.config.num_activated_experts
        m = model
        self._hook(m.x_embedder, self._x_embedder)
        self._hook(m.t_embedder, lambda mod, args, out: self._keep("t_embedder", out))
        self._hook(m.p_embedder, lambda mod, args, out: self._keep("p_embedder", out))
        self._hook(m.pe_embedder, lambda mod, args, out: self._keep("rope", out))
        n_proj = len(m.caption_projection)
        for i, proj in enumerate(m.caption_projection):
            key = "caption.t5" if i == n_proj - 1 else f"caption.llama.{i}"
            self._hook(proj, lambda mod, args, out, key=key: self._keep(key, out))
        for i, wrapper in enumerate(m.double_stream_blocks):
            p = f"double.{i}"
            blk = wrapper.block
            self._pre_hook(wrapper, lambda mod, args, kw, p=p, i=i: self._double_in(p, i, kw))
            self._hook(wrapper, lambda mod, args, out, p=p: self._keep2(p + ".image", p + ".text", out))
            self._hook(
                blk.attn1, lambda mod, args, out, p=p: self._keep2(p + ".attn.image", p + ".attn.text", out)
            )
            self._hook(blk.ff_i, lambda mod, args, out, p=p: self._keep(p + ".ff_i", out))
            self._hook(blk.ff_t, lambda mod, args, out, p=p: self._keep(p + ".ff_t", out))
            self._hook(blk.ff_i.gate, lambda mod, args, out, p=p: self._gate(p, mod, args, out))
        for i, wrapper in enumerate(m.single_stream_blocks):
            p = f"single.{i}"
            blk = wrapper.block
            self._pre_hook(wrapper, lambda mod, args, kw, p=p, i=i: self._single_in(p, i, kw))
            self._hook(wrapper, lambda mod, args, out, p=p: self._keep(p, out))
            self._hook(blk.attn1, lambda mod, args, out, p=p: self._keep(p + ".attn", out))
            self._hook(blk.ff_i, lambda mod, args, out, p=p: self._keep(p + ".ff_i", out))
            self._hook(blk.ff_i.gate, lambda mod, args, out, p=p: self._gate(p, mod, args, out))
        self._hook(m.final_layer, lambda mod, args, out: self._keep("final_layer", out))

    def _hook(self, module, fn):
        self.handles.append(module.register_forward_hook(fn))

    def _pre_hook(self, module, fn):
        self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def _keep(self, key, tensor):
        assert key not in self.out, f"{key} recorded twice"
        self.out[key] = tensor[0:1].detach().clone().contiguous()

    def _keep2(self, key_a, key_b, pair):
        self._keep(key_a, pair[0])
        self._keep(key_b, pair[1])

    def _x_embedder(self, mod, args, out):
        self._keep("x_embedder.input", args[0])
        self._keep("x_embedder", out)

    def _double_in(self, p, i, kw):
        if i == 0 and kw.get("hidden_states_masks") is not None:
            self._keep("mask", kw["hidden_states_masks"])
        self._keep(p + ".text_in", kw["encoder_hidden_states"])

    def _single_in(self, p, i, kw):
        if i == 0 and kw.get("hidden_states_masks") is not None:
            self._keep("single_mask", kw["hidden_states_masks"])
        self._keep(p + ".in", kw["hidden_states"])

    def _gate(self, p, mod, args, out):
        x = args[0]
        b, s, _ = x.shape
        topk_idx, topk_weight, _ = out
        idx, order = topk_idx.sort(dim=-1)
        weight = topk_weight.gather(-1, order)
        self._keep(p + ".gate.idx", idx.view(b, s, -1))
        self._keep(p + ".gate.weight", weight.view(b, s, -1))
        self.min_margin = min(self.min_margin, golden_util.gate_margin(mod, x, self.k))

    def finish(self):
        for h in self.handles:
            h.remove()
        self.out["temb"] = (self.out["t_embedder"] + self.out["p_embedder"]).contiguous()
        return self.out


def forward(model, inputs):
    with torch.no_grad():
        sample = model(**inputs, return_dict=False)[0]
    return sample.float().contiguous()


def ablation_effects(model, case_inputs, expected):
    """For every parameter tensor: replace it by its trivial value (ones for RMSNorm weights, zeros
    otherwise), as a port that failed to load it would, and return the largest change of `sample`
    over the model's cases. Every tensor must matter (e.g. every routed expert must be chosen by
    some token in some case)."""
    return golden_util.ablation_effects(
        model, lambda: max((forward(model, inp) - exp).abs().max().item() for inp, exp in zip(case_inputs, expected))
    )


# --------------------------------------------------------------------------------------------
# Main path


def generate():
    t0 = time.time()
    # One thread: fastest for these tiny shapes, and no thread-count-dependent reduction order.
    torch.set_num_threads(1)
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    CASES_DIR.mkdir(parents=True, exist_ok=True)
    models = {name: save_model(name) for name in MODELS}

    per_model = {name: ([], []) for name in MODELS}
    summary = []
    for case in CASES:
        name, model_name = case["name"], case["model"]
        config = MODELS[model_name][0]
        model = models[model_name]
        inputs = make_inputs(config, case["latent"], case["timesteps"], case["seed"])
        rec = Recorder(model)
        sample = forward(model, inputs)
        inter = rec.finish()
        assert sample.shape == inputs["hidden_states"].shape
        assert torch.isfinite(sample).all()
        # Determinism / hook-independence: a second forward without hooks gives the same bits.
        assert torch.equal(sample, forward(model, inputs)), name
        out = golden_util.reset_dir(CASES_DIR / name)
        golden_util.write_json(out / "case.json", {"model": model_name, "note": case["note"], "seed": case["seed"]})
        golden_util.save_tensors(inputs, out / "inputs.safetensors")
        # diffusers' own bf16 run of the same case: how far bf16 compute drifts from f32 in the
        # reference itself. The Rust bf16 test is bounded relative to this drift.
        bf16_inputs = {k: (v if k == "timesteps" else v.to(torch.bfloat16)) for k, v in inputs.items()}
        sample_bf16 = forward(copy.deepcopy(model).to(torch.bfloat16), bf16_inputs)
        golden_util.save_tensors({"sample": sample, "sample_bf16": sample_bf16}, out / "expected.safetensors")
        golden_util.save_tensors(inter, out / "intermediates.safetensors")
        per_model[model_name][0].append(inputs)
        per_model[model_name][1].append(sample)
        # Precision headroom: the same case in float64 (same weights) must agree closely, i.e. no
        # top-k routing decision is so close to a tie that rounding could flip it.
        f64_diff = (forward(copy.deepcopy(model).double(), {k: v.double() for k, v in inputs.items()})
                    - sample.double()).abs().max().item()
        summary.append((name, model_name, tuple(sample.shape), sample.abs().max().item(), rec.min_margin, f64_diff))

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"{'case':<18}{'model':<9}{'sample shape':<16}{'max|sample|':>12}{'min top-k margin':>18}{'|f32-f64|':>11}")
    for name, model_name, shape, mx, margin, f64_diff in summary:
        print(f"{name:<18}{model_name:<9}{str(list(shape)):<16}{mx:>12.4f}{margin:>18.2e}{f64_diff:>11.1e}")
    for name, model_name, shape, mx, margin, f64_diff in summary:
        assert margin > MIN_MARGIN, f"{name}: top-k routing too close to a tie ({margin:.2e})"
        assert f64_diff < 1e-4, f"{name}: f32 and f64 disagree by {f64_diff:.2e}"

    for model_name, (inputs, expected) in per_model.items():
        effects = ablation_effects(models[model_name], inputs, expected)
        weakest = sorted(effects.items(), key=lambda kv: kv[1])[:3]
        print(f"{model_name}: {len(effects)} parameter tensors; smallest max|change of sample| when one "
              "is reset to ones/zeros: " + ", ".join(f"{k} {v:.1e}" for k, v in weakest))
        dead = [k for k, v in effects.items() if v < 1e-5]
        assert not dead, f"{model_name}: parameters with no effect on any case: {dead}"
    print(f"done in {time.time() - t0:.1f}s")


# --------------------------------------------------------------------------------------------
# Check of a checkpoint written by the Rust synthetic writer


def _raw_tensors(directory):
    """The tensors of a diffusers checkpoint folder, read straight from its safetensors file(s)."""
    index = directory / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    raw = {}
    for f in files:
        with safe_open(directory / f, framework="pt") as sf:
            for key in sf.keys():
                assert key not in raw, f"{key} in two shards"
                raw[key] = sf.get_tensor(key)
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        assert set(weight_map) == set(raw), "index weight_map and shard contents differ"
    return raw


def check_rust_synthetic(directory):
    """Loads a checkpoint written by `hidream synth --preset tiny --out DIR` (config.json +
    safetensors in the diffusers layout, single file or sharded with an index) and:

    1. loads it with `HiDreamImageTransformer2DModel.from_pretrained(DIR)`, asserting no missing,
       unexpected or mismatched keys and no load errors;
    2. asserts every parameter equals the raw safetensors tensor (same key set, same shape, equal
       values; a bf16 checkpoint is compared after the exact upcast);
    3. runs a float32 forward on fixed random inputs (seed 4242): a square batch-2 latent
       (4*patch x 4*patch) under the plain names, and a non-square batch-2 latent (pH=4, pW=3
       patches, or smaller if max_seq demands) under `nonsquare.<name>`;
    4. writes `DIR/diffusers_check.safetensors` with the inputs and `sample` / `nonsquare.sample`.
    """
    directory = Path(directory)
    model, info = HiDreamImageTransformer2DModel.from_pretrained(directory, output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"{key}: {info.get(key)}"

    raw = _raw_tensors(directory)
    state = model.state_dict()
    missing, unexpected = sorted(set(state) - set(raw)), sorted(set(raw) - set(state))
    assert not missing and not unexpected, f"missing {missing}, unexpected {unexpected}"
    dtypes = set()
    for key, tensor in raw.items():
        param = state[key]
        dtypes.add(str(tensor.dtype))
        assert param.shape == tensor.shape, f"{key}: {tuple(param.shape)} vs {tuple(tensor.shape)}"
        assert torch.equal(param.detach().to(torch.float64), tensor.to(torch.float64)), f"{key} differs"
    print(f"{directory}: {len(raw)} tensors ({', '.join(sorted(dtypes))}) match from_pretrained")

    model = model.to(torch.float32).eval()
    config = model.config
    p = config.patch_size
    max_seq = config.max_resolution[0] * config.max_resolution[1] // (p * p)
    ph, pw = 4, 3
    while ph * pw > max_seq and ph > 2:
        ph, pw = ph - 1, pw - 1
    cfg = dict(
        llama_layers=list(config.llama_layers),
        caption_channels=list(config.caption_channels),
        text_emb_dim=config.text_emb_dim,
    )
    c = config.in_channels
    out = {}
    square = make_inputs(cfg, (2, c, 4 * p, 4 * p), [937.5, 112.25], 4242)
    out.update(square)
    out["sample"] = forward(model, square)
    nonsquare = make_inputs(cfg, (2, c, ph * p, pw * p), [700.0, 31.25], 4243)
    out.update({f"nonsquare.{k}": v for k, v in nonsquare.items()})
    out["nonsquare.sample"] = forward(model, nonsquare)
    for k in ("sample", "nonsquare.sample"):
        assert torch.isfinite(out[k]).all(), k
    target = directory / "diffusers_check.safetensors"
    golden_util.save_tensors(out, target)
    print(f"wrote {target}: sample {list(out['sample'].shape)} max|.| {out['sample'].abs().max():.4f}, "
          f"nonsquare.sample {list(out['nonsquare.sample'].shape)} "
          f"max|.| {out['nonsquare.sample'].abs().max():.4f}")


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check-rust-synth", metavar="DIR", help="check a Rust-written synthetic checkpoint")
    args = parser.parse_args(argv)
    golden_util.quiet()
    if args.check_rust_synth:
        check_rust_synthetic(args.check_rust_synth)
    else:
        generate()


if __name__ == "__main__":
    main(sys.argv[1:])
