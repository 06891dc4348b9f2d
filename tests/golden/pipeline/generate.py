"""End-to-end golden fixtures for HiDream-I1 text-to-image (`generate`), every stage recorded.

How to run (from the repository root):

    ~/refenv/bin/python tests/golden/pipeline/generate.py

It was run with Python 3.11, torch 2.15.0 (CPU, float32, one thread), diffusers 0.42.1,
transformers 5.24.0, tokenizers 0.23.3, safetensors 0.8.0, numpy 2.4.6, pillow 13.0.0 and hdi1 1.0.4
(the official HiDream-I1 code, for its two schedulers). CI never runs this script: its outputs are
committed and the Rust test only reads them. Rerunning it rewrites `model/transformer/`, the
symlinks, `model/scheduler/`, `model/model_index.json` and `cases/` from fixed seeds; on the same
versions the output is bit-identical. It takes about 40 seconds. It needs the fixtures of
`tests/golden/text/` and `tests/golden/vae/` (it only reads them, through symlinks).

`--check-official` additionally runs the official hdi1 pipeline itself (its own
`HiDreamImagePipeline.__call__` and its own transformer class, on these weights) and compares it with
the recorded cases; it needs `einops` importable (`pip install einops`, or `PYTHONPATH` to a folder
holding it) and replaces `flash_attn` (CUDA only) by `torch`'s scaled_dot_product_attention. It
writes nothing. With einops 0.8.2 it reproduced every case bit for bit (per-step latents and u8
image). See "Cross-checks" below.

The model folder (`model/`, the Hugging Face layout of HiDream-ai/HiDream-I1-*)
-------------------------------------------------------------------------------
model/transformer/      NEW: a tiny random `HiDreamImageTransformer2DModel` (`save_pretrained`, float32,
                        one `diffusion_pytorch_model.safetensors`, about 2.5 MB: every SwiGLU is
                        rounded up to 256 hidden units by diffusers, so each of the 4 routed experts,
                        the shared experts and ff_t weigh 98 KB): `TRANSFORMER` below, i.e.
                        in/out channels 16 (the VAE's latent channels), caption_channels [32, 64]
                        (T5 d_model, Llama hidden size), text_emb_dim 64 (CLIP-L projection 24 + CLIP-G
                        projection 40), 2 heads x 16, axes_dims_rope [4, 6, 6], 2 double + 2 single
                        blocks, 4 routed experts top-2, max_resolution [16, 16] (max_seq 64),
                        llama_layers [3, 1, 0, 3] (layer 3 twice, layer 2 unused; the tiny Llama has 4).
                        Weights: as `tests/golden/transformer/generate.py` does (nn defaults under
                        `torch.manual_seed(TRANSFORMER_SEED)` (153, searched among 1..399 for the widest
                        top-2 routing margin over all cases), q/k RMSNorm weights 1 + 0.1 randn, every
                        adaLN_modulation linear x4). The script checks that resetting any one parameter
                        tensor (to ones for RMSNorm weights, zeros otherwise) changes the transformer
                        output of some recorded call: every tensor, every routed expert, matters.
model/text_encoder{,_2,_3}, model/tokenizer{,_2,_3}
                        relative symlinks to `../../text/model/<same name>` (tiny CLIP-L, CLIP-G, T5).
model/vae               relative symlink to `../../vae/model` (tiny Flux-layout AutoencoderKL, 16 latent
                        channels, 8x upsampling, scaling 0.3611, shift 0.1159, weights stored bf16).
llama                   (beside `model/`) relative symlink to `../text/llama` (tiny Llama 3 + tokenizer):
                        as for the real checkpoints, Llama is a separate folder.
model/scheduler/scheduler_config.json
                        hdi1-compatible, NOT what the Hub repos ship: what
                        `FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=3.0,
                        use_dynamic_shifting=False).save_config()` writes, i.e. the Full variant's sampler
                        as `hdi1/nf4.py` builds it (the Rust `SchedulerConfig::from_file` parses it). The
                        official Hub repos instead ship diffusers' `UniPCMultistepScheduler` (Full) and
                        `FlowMatchLCMScheduler` (Dev, Fast) configs, which compute other schedules; the
                        official code ignores the file and always passes its own scheduler, and so does
                        this script (and the Rust `generate`, which takes the variant's scheduler).
model/model_index.json  diffusers' `HiDreamImagePipeline` layout; `scheduler`, `text_encoder_4` and
                        `tokenizer_4` are `[null, null]`: they must be passed to `from_pretrained` (with
                        a diffusers class name there, `from_pretrained` fails: diffusers has no
                        `FlowUniPCMultistepScheduler`).

The pipeline object is `HiDreamImagePipeline.from_pretrained(model/, scheduler=..., tokenizer_4=...,
text_encoder_4=LlamaForCausalLM.from_pretrained(llama/, output_hidden_states=True,
output_attentions=True), torch_dtype=torch.float32)`; the VAE's bf16 weights are upcast to f32.

The code path: the official loop, replicated (and checked against diffusers' `__call__`)
----------------------------------------------------------------------------------------
Each case runs `run_official` below, which is `HiDreamImagePipeline.__call__` of the official code
(`hdi1/pipelines/hidream_image/pipeline_hidream_image.py`) step by step, with diffusers' pipeline
methods (`encode_prompt`, `prepare_latents`) and diffusers' transformer and VAE:

1. Size: `height = height or default_sample_size * vae_scale_factor` (same for width),
   `division = 2 * vae_scale_factor` (16), `S_max = (default_sample_size * vae_scale_factor) ** 2`,
   `scale = sqrt(S_max / (width * height))`, then `int(width * scale // division * division)` (same
   for height), in Python floats. `pipe.default_sample_size` is DEFAULT_SAMPLE_SIZE = 8 here (128 in
   the pipeline), so sizes are about 64x64 pixels, latents about 8x8.
2. Text: `encode_prompt(prompt, ..., do_classifier_free_guidance=g > 1, negative_prompt=...,
   max_sequence_length=128)`; with guidance the negative prompt (None -> "") is encoded separately
   (batch 1 each) and the inputs are batched `[negative, positive]` (= `[uncond, cond]`): T5 and
   pooled on dim 0, Llama on dim 1.
3. Latents: `randn_tensor((1, 16, 2 * (height // 16), 2 * (width // 16)), generator=
   torch.Generator().manual_seed(seed), dtype=float32)`, passed to the pipeline as `latents`.
4. Timesteps: the scheduler is `cls(num_train_timesteps=1000, shift=<variant shift>,
   use_dynamic_shifting=False)` as `hdi1/nf4.py` builds it; `mu = calculate_shift(transformer.max_seq)`
   (max_seq 64 here, so mu = 0.4675, not 1.15 as for the released 128x128 max_resolution); FlowUniPC:
   `set_timesteps(n, shift=exp(mu))`; FlashFlowMatchEuler: `set_timesteps(n, mu=mu)` through
   `retrieve_timesteps` (mu unused: no dynamic shifting).
5. Loop, for each t in `scheduler.timesteps`: `x = cat([latents] * 2)` with guidance;
   `out = transformer(hidden_states=x, timesteps=t.expand(B), encoder_hidden_states_t5,
   encoder_hidden_states_llama3, pooled_embeds)`; `noise_pred = -out`; with guidance
   `uncond, cond = noise_pred.chunk(2)`, `noise_pred = uncond + g * (cond - uncond)`;
   `latents = scheduler.step(noise_pred, t, latents)`. No generator reaches `step`:
   FlashFlowMatchEuler draws its noise with `randn_tensor(shape, generator=None)`, i.e. from torch's
   GLOBAL generator, which the script seeds with `torch.manual_seed(seed + 1)` just before the loop; the
   noise each step draws is recorded (by wrapping the scheduler module's `randn_tensor`).
6. VAE: `vae.decode(latents / scaling_factor + shift_factor)`, then
   `VaeImageProcessor.postprocess(image, "pil")`: `((x / 2 + 0.5).clamp(0, 1) * 255).round()` to u8
   (numpy rounds half to even).

Cross-checks (asserted on every run)
------------------------------------
* diffusers' own `HiDreamImagePipeline.__call__` (same latents, same seeds, same scheduler object
  kinds) reproduces every recorded per-step latent, the transformer timesteps and the u8 image BIT
  FOR BIT for the flash cases; for `full` only after its `set_timesteps` is made to receive
  `shift=exp(mu)`: diffusers' `__call__` special-cases only diffusers' `UniPCMultistepScheduler` and
  otherwise calls `retrieve_timesteps(scheduler, n, mu=mu)`, so hdi1's FlowUniPC gets `shift=None`
  and uses its configured 3.0 instead of the official exp(mu): timesteps [999, 899, 749, 499] instead
  of [999, 827, 614, 347] here, final latents off by 1.13. That is the only difference found.
* `--check-official`: hdi1's own pipeline and transformer give the same bits. In particular its
  non-square handling (the pipeline pads the patchified latents to max_seq itself and passes
  `img_sizes`/`img_ids`) equals what diffusers' transformer does internally in `patchify`.
* The tokens recorded are those the pipeline's own tokenizer calls returned (the `padding=
  "max_length"` calls, intercepted); the embeddings are `encode_prompt`'s outputs.
* Every transformer call is re-run in float64 (same inputs): max |f32 - f64| is printed and bounded,
  and no token's top-2 expert choice is within MIN_MARGIN of a tie (softmax scores), so that a
  faithful f32 port routes every token, padding tokens included, the same way.

Cases (`CASES`; B = 1 image each)
---------------------------------
full  "a red fox in the snow", negative "" (the default), guidance 5 (CFG, transformer batch 2
      [uncond, cond]), FlowUniPC (shift 3, set_timesteps shift exp(mu)), 4 steps, 64x64 requested and
      generated (latent 8x8). The transformer receives int64 timesteps: FlowUniPC truncates
      sigma * 1000 to int64 (999 for sigma 0.99983), while its `step` uses the unrounded sigmas.
dev   no guidance, FlashFlowMatchEuler shift 6, 3 steps, 520x520 requested -> 48x48 generated (latent
      6x6), not the exact 64x64: in floats 520 * sqrt(4096 / 270400) = 63.99999999999999, floored to a
      multiple of 16. The only such request among multiples of 8 below 600 (with default_sample_size
      8): a port must do this arithmetic in f64, in this order. Float32 timesteps.
fast  no guidance, FlashFlowMatchEuler shift 3, 3 steps, 112x64 (width x height) requested -> 80x48
      generated (latent 6x10, non-square: the transformer pads 15 patches to max_seq 64 and masks them).

FlashFlowMatchEuler's last step returns its input sample unchanged (it discards that step's model
output and draws no noise), so for dev/fast `final == step.{n-2}` although the transformer still runs
on the last timestep.

Files, per case: `cases/<case>/`
---------------------------------
case.json               name, variant (full/dev/fast), prompt, negative_prompt (null without guidance),
                        requested_size and size ({"width", "height"}, pixels), latent_size [h, w],
                        default_sample_size, vae_scale_factor, steps, guidance_scale, cfg (bool),
                        scheduler (class name), shift (the scheduler's constructor shift), mu,
                        set_timesteps_shift (exp(mu) for FlowUniPC, null otherwise), max_seq, seed
                        (initial latents: `torch.Generator().manual_seed(seed)`), noise_seed (global
                        `torch.manual_seed` before the loop), timestep_dtype (what the transformer
                        received), scheduler_config (`save_config` of the scheduler used), and the
                        diagnostics min_topk_margin, max_f32_f64_diff, decoded_out_of_range_fraction.
tokens.safetensors      int64, the tokenizers' outputs as the pipeline's calls return them
                        (padding "max_length", truncation, 128 tokens each; CLIPs get 128 tokens, not 77):
                        `<p>clip_l.ids`, `<p>clip_l.mask`, `<p>clip_g.ids`, `<p>clip_g.mask`, `<p>t5.ids`,
                        `<p>t5.mask`, `<p>llama.ids`, `<p>llama.mask`, each [1, 128], where `<p>` is empty
                        without guidance and `positive.` / `negative.` with it. The CLIP masks are
                        recorded but the pipeline does not pass them to the CLIP encoders.
embeddings.safetensors  float32, `encode_prompt`'s outputs: `<p>pooled_embeds` [1, 64] (CLIP-L text_embeds
                        then CLIP-G's), `<p>t5` [1, 128, 32], `<p>llama` [4, 1, 128, 64] (all of Llama's
                        hidden_states[1:], the last one after the final norm), `<p>` as for tokens. The
                        transformer receives cat(negative, positive) under guidance.
latents.safetensors     float32: `initial` [1, 16, h, w]; for each step i: `model_output.{i}` [B', 16, h, w],
                        the raw transformer output (B' = 2 under guidance: [uncond, cond]), `noise_pred.{i}`
                        [1, 16, h, w], what `step` got (negated, guided), and `step.{i}` [1, 16, h, w],
                        what `step` returned; `final` [1, 16, h, w] (= step.{n-1}).
noise.safetensors       flash cases only, float32 `noise` [steps, 1, 16, h, w]: row i is the noise step i
                        drew; the last row is all zeros (the last step draws none).
timesteps.safetensors   float32 `timesteps` [steps] (the value every batch row of the transformer
                        received at step i; integers for FlowUniPC, which passes int64), float32
                        `sigmas` [steps + 1] (`scheduler.sigmas`).
image.safetensors       `vae_input` [1, 16, h, w] float32 (`final / scaling_factor + shift_factor`),
                        `decoded` [1, 3, H, W] float32 (the VAE output, before clamping: mostly in
                        [-1, 1], not all), `uint8` [1, H, W, 3] (the postprocessed pixels).
image.png               the uint8 image, for the record.

cases/components.json: the sha256 of every file of the linked components (text encoders, tokenizers,
VAE, Llama) and of the transformer, as they were when the cases were generated: if a linked fixture is
regenerated, compare, and rerun this script.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import diffusers
import transformers
from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel
from diffusers.pipelines.hidream_image import pipeline_hidream_image as diffusers_pipeline_module
from diffusers.utils.torch_utils import randn_tensor
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import golden_util  # noqa: E402  (tests/golden/golden_util.py)

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "model"
LLAMA_LINK = HERE / "llama"
CASES_DIR = HERE / "cases"
TEXT_DIR = HERE.parent / "text"
VAE_DIR = HERE.parent / "vae"

# Relative symlinks: name in model/ -> target (relative to model/).
COMPONENT_LINKS = {
    "text_encoder": "../../text/model/text_encoder",
    "text_encoder_2": "../../text/model/text_encoder_2",
    "text_encoder_3": "../../text/model/text_encoder_3",
    "tokenizer": "../../text/model/tokenizer",
    "tokenizer_2": "../../text/model/tokenizer_2",
    "tokenizer_3": "../../text/model/tokenizer_3",
    "vae": "../../vae/model",
}
LLAMA_TARGET = "../text/llama"

MAX_SEQUENCE_LENGTH = 128
DEFAULT_SAMPLE_SIZE = 8
TRANSFORMER_SEED = 153  # picked (of 1..399) for the widest top-2 routing margin over all cases
ADALN_SCALE = 4.0
# Smallest allowed gap between the 2nd and 3rd softmax gate score of any token in any transformer call.
MIN_MARGIN = 1e-4
MAX_F64_DIFF = 1e-4

TRANSFORMER = dict(
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    caption_channels=[32, 64],  # [T5 d_model, Llama hidden_size], checked against the text configs
    text_emb_dim=64,  # CLIP-L projection_dim 24 + CLIP-G projection_dim 40, checked likewise
    num_routed_experts=4,
    num_activated_experts=2,
    axes_dims_rope=[4, 6, 6],
    max_resolution=[16, 16],
    llama_layers=[3, 1, 0, 3],
)


UNIPC_MODULE = golden_util.hdi1_scheduler_module("fm_solvers_unipc")
FLASH_MODULE = golden_util.hdi1_scheduler_module("flash_flow_match")
UniPC = UNIPC_MODULE.FlowUniPCMultistepScheduler
Flash = FLASH_MODULE.FlashFlowMatchEulerDiscreteScheduler

# hdi1/nf4.py, MODEL_CONFIGS: the variant's scheduler class and constructor shift.
VARIANTS = {
    "full": dict(scheduler=UniPC, shift=3.0),
    "dev": dict(scheduler=Flash, shift=6.0),
    "fast": dict(scheduler=Flash, shift=3.0),
}

CASES = [
    dict(name="full", variant="full", prompt="a red fox in the snow", negative_prompt="", size=(64, 64),
         steps=4, guidance=5.0, seed=101),
    dict(name="dev", variant="dev", prompt="a lighthouse on a rocky coast at dusk", negative_prompt=None,
         size=(520, 520), steps=3, guidance=0.0, seed=202),
    dict(name="fast", variant="fast", prompt="an old fisherman with a white beard, oil on canvas",
         negative_prompt=None, size=(112, 64), steps=3, guidance=0.0, seed=303),
]

calculate_shift = diffusers_pipeline_module.calculate_shift
retrieve_timesteps = diffusers_pipeline_module.retrieve_timesteps


# --------------------------------------------------------------------------------------------
# Model folder


def check_text_dims():
    """The transformer's caption_channels and text_emb_dim must fit the tiny text encoders."""
    cfg = lambda p: json.loads((p / "config.json").read_text())  # noqa: E731
    t5 = cfg(TEXT_DIR / "model" / "text_encoder_3")["d_model"]
    llama = cfg(TEXT_DIR / "llama")
    clip_l = cfg(TEXT_DIR / "model" / "text_encoder")["projection_dim"]
    clip_g = cfg(TEXT_DIR / "model" / "text_encoder_2")["projection_dim"]
    assert TRANSFORMER["caption_channels"] == [t5, llama["hidden_size"]], (t5, llama["hidden_size"])
    assert TRANSFORMER["text_emb_dim"] == clip_l + clip_g, (clip_l, clip_g)
    assert max(TRANSFORMER["llama_layers"]) < llama["num_hidden_layers"]
    vae = cfg(VAE_DIR / "model")
    assert TRANSFORMER["in_channels"] == TRANSFORMER["out_channels"] == vae["latent_channels"]


def symlink(link: Path, target: str):
    if link.is_symlink() or link.exists():
        if link.is_symlink() and os.readlink(link) == target:
            return
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        else:
            link.unlink()
    os.symlink(target, link)
    assert link.resolve().is_dir(), f"{link} -> {target} does not resolve"


def write_model_folder():
    check_text_dims()
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    out = golden_util.reset_dir(MODEL_DIR / "transformer")
    model = golden_util.build_hidream_transformer(TRANSFORMER, TRANSFORMER_SEED, ADALN_SCALE)
    model.save_pretrained(out, safe_serialization=True)
    loaded, info = HiDreamImageTransformer2DModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in info), info
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)

    for name, target in COMPONENT_LINKS.items():
        symlink(MODEL_DIR / name, target)
    symlink(LLAMA_LINK, LLAMA_TARGET)

    make_scheduler("full").save_config(golden_util.reset_dir(MODEL_DIR / "scheduler"))

    model_index = {
        "_class_name": "HiDreamImagePipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": [None, None],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "text_encoder_4": [None, None],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5Tokenizer"],
        "tokenizer_4": [None, None],
        "transformer": ["diffusers", "HiDreamImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    golden_util.write_json(MODEL_DIR / "model_index.json", model_index)


def make_scheduler(variant):
    v = VARIANTS[variant]
    return v["scheduler"](num_train_timesteps=1000, shift=v["shift"], use_dynamic_shifting=False)


def scheduler_config(scheduler):
    return {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")} | {
        "_class_name": type(scheduler).__name__
    }


def load_pipeline():
    pipe = HiDreamImagePipeline.from_pretrained(
        MODEL_DIR,
        scheduler=make_scheduler("full"),
        tokenizer_4=PreTrainedTokenizerFast.from_pretrained(LLAMA_LINK),
        text_encoder_4=LlamaForCausalLM.from_pretrained(
            LLAMA_LINK, output_hidden_states=True, output_attentions=True
        ).eval(),
        torch_dtype=torch.float32,
    )
    pipe.set_progress_bar_config(disable=True)
    for name in ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"]:
        module = getattr(pipe, name)
        assert not module.training, name
        assert all(p.dtype == torch.float32 for p in module.parameters()), name
    assert pipe.vae_scale_factor == 8
    pipe.default_sample_size = DEFAULT_SAMPLE_SIZE
    return pipe


# --------------------------------------------------------------------------------------------
# Recorders


class TokenRecorder:
    """Intercepts the pipeline's own tokenizer calls (the padding="max_length" ones; the "longest"
    calls only feed a truncation warning)."""

    def __init__(self, pipe):
        self.toks = {"clip_l": pipe.tokenizer, "clip_g": pipe.tokenizer_2, "t5": pipe.tokenizer_3,
                     "llama": pipe.tokenizer_4}
        self.names = {id(tok): name for name, tok in self.toks.items()}
        self.calls = []

    def __enter__(self):
        self.saved = PreTrainedTokenizerBase.__call__
        for tok in self.toks.values():
            assert type(tok).__call__ is self.saved, type(tok)
        recorder = self

        def call(tok, text=None, *args, **kwargs):
            out = recorder.saved(tok, text, *args, **kwargs)
            if kwargs.get("padding") == "max_length":
                recorder.calls.append((recorder.names[id(tok)], list(text), out))
            return out

        PreTrainedTokenizerBase.__call__ = call
        return self

    def __exit__(self, *exc):
        PreTrainedTokenizerBase.__call__ = self.saved


class NoiseRecorder:
    """Wraps the flash scheduler module's `randn_tensor` and keeps what it returns."""

    def __init__(self):
        self.noise = []

    def __enter__(self):
        self.saved = FLASH_MODULE.randn_tensor

        def wrapped(*args, **kwargs):
            assert kwargs.get("generator") is None  # the pipelines pass none: global RNG
            out = self.saved(*args, **kwargs)
            self.noise.append(out.clone())
            return out

        FLASH_MODULE.randn_tensor = wrapped
        return self

    def __exit__(self, *exc):
        FLASH_MODULE.randn_tensor = self.saved


class GateMargins:
    """Smallest (k-th minus (k+1)-th) softmax gate score over every token of every MoE call."""

    def __init__(self, model):
        self.k = model.config.num_activated_experts
        self.min_margin = math.inf
        self.handles = []
        for name, module in model.named_modules():
            if name.endswith("ff_i.gate"):
                self.handles.append(module.register_forward_hook(self.hook))

    def hook(self, mod, args, out):
        self.min_margin = min(self.min_margin, golden_util.gate_margin(mod, args[0], self.k))

    def remove(self):
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# The official loop


def pipeline_size(pipe, width, height):
    # HiDreamImagePipeline.__call__ (hdi1 and diffusers alike), verbatim arithmetic.
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    division = pipe.vae_scale_factor * 2
    S_max = (pipe.default_sample_size * pipe.vae_scale_factor) ** 2
    scale = S_max / (width * height)
    scale = math.sqrt(scale)
    width, height = int(width * scale // division * division), int(height * scale // division * division)
    return width, height


def transformer_call(pipe, latent_model_input, timestep, t5, llama, pooled):
    return pipe.transformer(
        hidden_states=latent_model_input,
        timesteps=timestep,
        encoder_hidden_states_t5=t5,
        encoder_hidden_states_llama3=llama,
        pooled_embeds=pooled,
        return_dict=False,
    )[0]


def run_official(pipe, case):
    """The official `HiDreamImagePipeline.__call__`, step by step (see the module docstring)."""
    device = torch.device("cpu")
    rec = {"tensors": {}, "calls": []}
    tensors = rec["tensors"]
    req_w, req_h = case["size"]
    width, height = pipeline_size(pipe, req_w, req_h)
    guidance = case["guidance"]
    cfg = guidance > 1

    # 3. Encode prompt.
    with TokenRecorder(pipe) as tokrec, torch.no_grad():
        t5, neg_t5, llama, neg_llama, pooled, neg_pooled = pipe.encode_prompt(
            prompt=case["prompt"],
            negative_prompt=case["negative_prompt"],
            do_classifier_free_guidance=cfg,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
    tokens = {}
    for name, text, out in tokrec.calls:
        if cfg and text == [case["negative_prompt"] or ""]:
            prefix = "negative."
        else:
            assert text == [case["prompt"]], text
            prefix = "positive." if cfg else ""
        assert prefix + name + ".ids" not in tokens
        tokens[prefix + name + ".ids"] = out["input_ids"].to(torch.int64)
        tokens[prefix + name + ".mask"] = out["attention_mask"].to(torch.int64)
    assert len(tokens) == 8 * (2 if cfg else 1), sorted(tokens)
    embeds = {}
    for prefix, (p, t, l) in ({"positive.": (pooled, t5, llama), "negative.": (neg_pooled, neg_t5, neg_llama)}
                              if cfg else {"": (pooled, t5, llama)}).items():
        embeds[prefix + "pooled_embeds"], embeds[prefix + "t5"], embeds[prefix + "llama"] = p, t, l
    if cfg:
        t5 = torch.cat([neg_t5, t5], dim=0)
        llama = torch.cat([neg_llama, llama], dim=1)
        pooled = torch.cat([neg_pooled, pooled], dim=0)

    # 4. Latents.
    shape = (1, pipe.transformer.config.in_channels, 2 * (height // 16), 2 * (width // 16))
    initial = randn_tensor(shape, generator=torch.Generator().manual_seed(case["seed"]), device=device,
                           dtype=pooled.dtype)
    latents = pipe.prepare_latents(1, shape[1], height, width, pooled.dtype, device, None, initial.clone())
    tensors["initial"] = initial

    # 5. Timesteps.
    scheduler = make_scheduler(case["variant"])
    mu = calculate_shift(pipe.transformer.max_seq)
    if isinstance(scheduler, UniPC):
        scheduler.set_timesteps(case["steps"], device=device, shift=math.exp(mu))
        timesteps = scheduler.timesteps
    else:
        timesteps, _ = retrieve_timesteps(scheduler, case["steps"], device, sigmas=None, mu=mu)
    assert len(timesteps) == case["steps"]
    sigmas = scheduler.sigmas.clone().float()

    # 6. Denoising loop.
    received = []
    margins = GateMargins(pipe.transformer)
    torch.manual_seed(case["seed"] + 1)
    with NoiseRecorder() as noiserec, torch.no_grad():
        for i, t in enumerate(timesteps):
            latent_model_input = torch.cat([latents] * 2) if cfg else latents
            timestep = t.expand(latent_model_input.shape[0])
            received.append(timestep.clone())
            out = transformer_call(pipe, latent_model_input, timestep, t5, llama, pooled)
            rec["calls"].append(dict(hidden_states=latent_model_input.clone(), timesteps=timestep.clone(),
                                     encoder_hidden_states_t5=t5, encoder_hidden_states_llama3=llama,
                                     pooled_embeds=pooled, out=out.clone()))
            tensors[f"model_output.{i}"] = out.clone()
            noise_pred = -out
            if cfg:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
            tensors[f"noise_pred.{i}"] = noise_pred.clone()
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            assert latents.dtype == torch.float32
            tensors[f"step.{i}"] = latents.clone()
    margins.remove()
    tensors["final"] = latents.clone()

    # 7. VAE and postprocessing.
    with torch.no_grad():
        vae_input = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        decoded = pipe.vae.decode(vae_input, return_dict=False)[0]
    pil = pipe.image_processor.postprocess(decoded, output_type="pil")
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in pil]))
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, height, width, 3), pixels.shape

    is_flash = isinstance(scheduler, Flash)
    if is_flash:
        assert len(noiserec.noise) == case["steps"] - 1  # the last step draws none
        noise = torch.zeros((case["steps"],) + shape)
        for i, n in enumerate(noiserec.noise):
            noise[i] = n
        # The recorded noise is exactly the global generator's stream after torch.manual_seed(seed + 1).
        g = torch.Generator().manual_seed(case["seed"] + 1)
        for n in noiserec.noise:
            assert torch.equal(n, torch.randn(shape, generator=g))
        rec["noise"] = noise
        assert torch.equal(tensors["final"], tensors[f"step.{case['steps'] - 2}"])
    else:
        assert not noiserec.noise

    assert all(torch.equal(r, r[0].expand_as(r)) for r in received)
    rec.update(
        tokens=tokens,
        embeds={k: v.contiguous() for k, v in embeds.items()},
        timesteps=torch.stack([r[0] for r in received]).float(),
        timestep_dtype=str(received[0].dtype).replace("torch.", ""),
        sigmas=sigmas,
        image={"vae_input": vae_input, "decoded": decoded.contiguous(), "uint8": pixels},
        pil=pil[0],
        width=width,
        height=height,
        mu=mu,
        scheduler=scheduler,
        min_margin=margins.min_margin,
    )
    return rec


# --------------------------------------------------------------------------------------------
# Cross-check: diffusers' own __call__


def run_diffusers_call(pipe, case, initial, official_shift):
    """`pipe(...)` with the same inputs; returns per-step latents, the transformer's timesteps and the
    u8 image. With `official_shift`, FlowUniPC's `set_timesteps` receives `shift=exp(mu)` as in hdi1."""
    scheduler = make_scheduler(case["variant"])
    mu = calculate_shift(pipe.transformer.max_seq)
    if official_shift and isinstance(scheduler, UniPC):
        original = scheduler.set_timesteps
        scheduler.set_timesteps = lambda *a, **kw: original(*a, **{**kw, "shift": math.exp(mu)})
    pipe.scheduler = scheduler
    steps, timesteps = [], []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kw: timesteps.append(kw["timesteps"].clone()), with_kwargs=True)

    def on_step_end(p, i, t, kw):
        steps.append(kw["latents"].clone())
        return {}

    torch.manual_seed(case["seed"] + 1)
    try:
        with torch.no_grad():
            images = pipe(
                case["prompt"],
                negative_prompt=case["negative_prompt"],
                width=case["size"][0],
                height=case["size"][1],
                guidance_scale=case["guidance"],
                num_inference_steps=case["steps"],
                latents=initial.clone(),
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                callback_on_step_end=on_step_end,
                output_type="pil",
                return_dict=False,
            )[0]
    finally:
        handle.remove()
    return steps, timesteps, np.asarray(images[0])


def cross_check_diffusers(pipe, case, rec):
    steps, timesteps, pixels = run_diffusers_call(pipe, case, rec["tensors"]["initial"], official_shift=True)
    for i, s in enumerate(steps):
        assert torch.equal(s, rec["tensors"][f"step.{i}"]), (case["name"], i)
    for got, want in zip(timesteps, rec["timesteps"]):
        assert got.dtype == torch.int64 if rec["timestep_dtype"] == "int64" else got.dtype == torch.float32
        assert torch.equal(got.float(), want.expand_as(got)), (case["name"], got, want)
    assert np.array_equal(pixels, rec["image"]["uint8"][0].numpy()), case["name"]
    note = "diffusers __call__ identical (per-step latents, timesteps, u8 image)"
    if isinstance(rec["scheduler"], UniPC):
        # diffusers' own handling of this scheduler: shift=None -> the configured 3.0.
        steps_d, timesteps_d, pixels_d = run_diffusers_call(pipe, case, rec["tensors"]["initial"], False)
        diff = (steps_d[-1] - rec["tensors"]["final"]).abs().max().item()
        note += (f" once set_timesteps gets shift=exp(mu); unpatched, diffusers gives timesteps "
                 f"{[int(t[0]) for t in timesteps_d]} instead of {[int(t) for t in rec['timesteps']]}, "
                 f"final latents off by {diff:.3f}")
    return note


# --------------------------------------------------------------------------------------------
# Checks on the transformer


def forward(model, call, dtype=torch.float32):
    inputs = {k: (v if k == "timesteps" else v.to(dtype)) for k, v in call.items() if k != "out"}
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def f64_diff(model, calls):
    model64 = HiDreamImageTransformer2DModel.from_pretrained(MODEL_DIR / "transformer").double().eval()
    return max((forward(model64, c, torch.float64) - c["out"].double()).abs().max().item() for c in calls)


def ablation(model, calls):
    """For each parameter tensor, the largest change of any call's output when it is reset."""
    return golden_util.ablation_effects(
        model, lambda: max((forward(model, c) - c["out"]).abs().max().item() for c in calls)
    )


# --------------------------------------------------------------------------------------------
# Official pipeline (optional)


def check_official(pipe, recs):
    """Runs hdi1's own HiDreamImagePipeline (and hdi1's transformer class on the same weights) on each
    case and compares with the recorded run (flash_attn replaced by SDPA: expected equal to ~1e-6, found
    bit-identical)."""
    golden_util.import_hdi1()  # needs einops
    from hdi1.models.transformers.transformer_hidream_image import HiDreamImageTransformer2DModel as Official
    from hdi1.pipelines.hidream_image.pipeline_hidream_image import HiDreamImagePipeline as OfficialPipeline
    import hdi1.schedulers.flash_flow_match as official_flash
    import hdi1.schedulers.fm_solvers_unipc as official_unipc

    transformer = Official.from_pretrained(MODEL_DIR / "transformer", torch_dtype=torch.float32).eval()
    ref = pipe.transformer.state_dict()
    got = transformer.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    for rec, case in zip(recs, CASES):
        cls = {"full": official_unipc.FlowUniPCMultistepScheduler}.get(
            case["variant"], official_flash.FlashFlowMatchEulerDiscreteScheduler)
        scheduler = cls(num_train_timesteps=1000, shift=VARIANTS[case["variant"]]["shift"],
                        use_dynamic_shifting=False)
        official = OfficialPipeline(
            scheduler=scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
            text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2, text_encoder_3=pipe.text_encoder_3,
            tokenizer_3=pipe.tokenizer_3, text_encoder_4=pipe.text_encoder_4, tokenizer_4=pipe.tokenizer_4)
        official.transformer = transformer  # as hdi1/nf4.py does: the pipeline does not take it
        official.set_progress_bar_config(disable=True)
        official.default_sample_size = DEFAULT_SAMPLE_SIZE
        steps = []

        def on_step_end(p, i, t, kw):
            steps.append(kw["latents"].clone())
            return {}

        torch.manual_seed(case["seed"] + 1)
        with torch.no_grad():
            images = official(case["prompt"], negative_prompt=case["negative_prompt"], width=case["size"][0],
                              height=case["size"][1], guidance_scale=case["guidance"],
                              num_inference_steps=case["steps"], latents=rec["tensors"]["initial"].clone(),
                              callback_on_step_end=on_step_end, output_type="pil", return_dict=False)[0]
        assert len(steps) == case["steps"]
        diff = max((s - rec["tensors"][f"step.{i}"]).abs().max().item() for i, s in enumerate(steps))
        pixels = np.asarray(images[0]).astype(np.int16) - rec["image"]["uint8"][0].numpy().astype(np.int16)
        print(f"official hdi1 pipeline, {case['name']}: per-step latents max |diff| {diff:.2e}, "
              f"u8 image max |diff| {np.abs(pixels).max()}")
        assert diff < 1e-4, case["name"]


# --------------------------------------------------------------------------------------------
# Main


def write_case(case, rec, pipe, note):
    out = golden_util.reset_dir(CASES_DIR / case["name"])
    steps = case["steps"]
    latent_tensors = {"initial": rec["tensors"]["initial"]}
    for i in range(steps):
        for key in ["model_output", "noise_pred", "step"]:
            latent_tensors[f"{key}.{i}"] = rec["tensors"][f"{key}.{i}"]
    latent_tensors["final"] = rec["tensors"]["final"]
    golden_util.save_tensors(rec["tokens"], out / "tokens.safetensors")
    golden_util.save_tensors(rec["embeds"], out / "embeddings.safetensors")
    golden_util.save_tensors(latent_tensors, out / "latents.safetensors")
    if "noise" in rec:
        golden_util.save_tensors({"noise": rec["noise"]}, out / "noise.safetensors")
    golden_util.save_tensors({"timesteps": rec["timesteps"], "sigmas": rec["sigmas"]}, out / "timesteps.safetensors")
    golden_util.save_tensors(rec["image"], out / "image.safetensors")
    rec["pil"].save(out / "image.png")
    decoded = rec["image"]["decoded"]
    scheduler = rec["scheduler"]
    meta = {
        "name": case["name"],
        "variant": case["variant"],
        "prompt": case["prompt"],
        "negative_prompt": case["negative_prompt"] if case["guidance"] > 1 else None,
        "requested_size": {"width": case["size"][0], "height": case["size"][1]},
        "size": {"width": rec["width"], "height": rec["height"]},
        "latent_size": list(rec["tensors"]["initial"].shape[2:]),
        "default_sample_size": DEFAULT_SAMPLE_SIZE,
        "vae_scale_factor": pipe.vae_scale_factor,
        "steps": steps,
        "guidance_scale": case["guidance"],
        "cfg": case["guidance"] > 1,
        "scheduler": type(scheduler).__name__,
        "shift": VARIANTS[case["variant"]]["shift"],
        "mu": rec["mu"],
        "set_timesteps_shift": math.exp(rec["mu"]) if isinstance(scheduler, UniPC) else None,
        "max_seq": pipe.transformer.max_seq,
        "seed": case["seed"],
        "noise_seed": case["seed"] + 1,
        "timestep_dtype": rec["timestep_dtype"],
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "scheduler_config": scheduler_config(scheduler),
        "min_topk_margin": float(f"{rec['min_margin']:.3e}"),
        "max_f32_f64_diff": float(f"{rec['f64_diff']:.3e}"),
        "decoded_out_of_range_fraction": round(((decoded < -1) | (decoded > 1)).float().mean().item(), 4),
        "cross_check": note,
    }
    golden_util.write_json(out / "case.json", meta)


def write_components():
    hashes = {}
    for folder in sorted([*COMPONENT_LINKS, "transformer", "scheduler"]) + ["../llama"]:
        root = MODEL_DIR / folder
        for f in sorted(root.resolve().iterdir()):
            hashes[f"{folder.removeprefix('../')}/{f.name}"] = hashlib.sha256(f.read_bytes()).hexdigest()
    golden_util.write_json(CASES_DIR / "components.json", hashes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check-official", action="store_true",
                        help="also run hdi1's own pipeline and transformer (needs einops)")
    args = parser.parse_args()
    t0 = time.time()
    torch.set_num_threads(1)
    write_model_folder()
    pipe = load_pipeline()

    recs, notes = [], []
    for case in CASES:
        rec = run_official(pipe, case)
        notes.append(cross_check_diffusers(pipe, case, rec))
        rec["f64_diff"] = f64_diff(pipe.transformer, rec["calls"])
        recs.append(rec)

    effects = ablation(pipe.transformer, [c for rec in recs for c in rec["calls"]])
    weakest = sorted(effects.items(), key=lambda kv: kv[1])[:3]
    dead = [k for k, v in effects.items() if v < 1e-5]

    golden_util.reset_dir(CASES_DIR)
    for case, rec, note in zip(CASES, recs, notes):
        write_case(case, rec, pipe, note)
    write_components()

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    print(f"transformer max_seq {pipe.transformer.max_seq}, mu {recs[0]['mu']:.6f}, exp(mu) {math.exp(recs[0]['mu']):.6f}")
    for case, rec, note in zip(CASES, recs, notes):
        fin = rec["tensors"]["final"]
        dec = rec["image"]["decoded"]
        print(f"{case['name']:<5} {case['size'][0]}x{case['size'][1]} -> {rec['width']}x{rec['height']}, "
              f"latent {list(fin.shape)}, timesteps {[round(t, 3) for t in rec['timesteps'].tolist()]} "
              f"({rec['timestep_dtype']}), max|final| {fin.abs().max():.3f}, decoded in "
              f"[{dec.min():.3f}, {dec.max():.3f}], min top-k margin {rec['min_margin']:.2e}, "
              f"|f32-f64| {rec['f64_diff']:.1e}")
        print(f"      {note}")
    print(f"{len(effects)} transformer parameter tensors; smallest max|change| of an output when one is reset: "
          + ", ".join(f"{k} {v:.1e}" for k, v in weakest))
    for case, rec in zip(CASES, recs):
        assert rec["min_margin"] > MIN_MARGIN, f"{case['name']}: top-k routing near a tie ({rec['min_margin']:.2e})"
        assert rec["f64_diff"] < MAX_F64_DIFF, f"{case['name']}: f32 and f64 differ by {rec['f64_diff']:.2e}"
    assert not dead, f"parameters with no effect: {dead}"
    if args.check_official:
        check_official(pipe, recs)
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
