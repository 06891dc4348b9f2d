"""Golden fixtures for the VAE decode stage (diffusers' `AutoencoderKL` in the Flux layout).

How to run (from the repository root):

    ~/refenv/bin/python tests/golden/vae/generate.py

It was run with Python 3.11, torch 2.15.0 (CPU, float32), diffusers 0.42.1, safetensors 0.8.0.
CI never runs this script: its outputs are committed and the Rust test (`golden.rs`) only reads
them. Rerunning it rewrites `tests/golden/vae/{model,cases}/` from fixed seeds; on the same versions
the output is bit-identical. It takes a few seconds on CPU.

Model
-----
model/  a tiny random `AutoencoderKL` with the structure of the FLUX.1 / HiDream-I1 VAE (4 levels,
        so 8x upsampling; 16 latent channels; no quant_conv / post_quant_conv; mid-block attention;
        3 resnets per up block; scaling_factor 0.3611, shift_factor 0.1159) but tiny widths
        (block_out_channels [16, 16, 32, 32], norm_num_groups 8; 210k decoder parameters), saved
        with `save_pretrained` as `config.json` + `diffusion_pytorch_model.safetensors` in bfloat16
        (as the real FLUX.1 VAE file is; encoder included, as diffusers writes it). Weights:
        diffusers' default init under `torch.manual_seed(MODEL_SEED)`, then every GroupNorm weight
        set to 1 + 0.1*randn and bias to 0.1*randn, so that no tensor is trivial. The expected
        outputs are computed in float32 on the bf16-rounded weights (the model is loaded back from
        disk with `torch_dtype=float32`), so a port that loads the file into f32 must match to f32
        precision.

Cases
-----
cases/<case>.safetensors, float32 unless said:
  latents       [B, 16, h, w]  transformer-space latents (randn), what the denoiser hands over
  image         [B, 3, 8h, 8w] `vae.decode(latents / scaling_factor + shift_factor).sample`, exactly
                               the two lines of `HiDreamImagePipeline.__call__` (the transform in f32)
  image_tiled   [B, 3, 8h, 8w] the same after `vae.enable_tiling()` with `tile_latent_min_size` =
                               TILE_LATENT, `tile_sample_min_size` = 8 * TILE_LATENT, and the default
                               `tile_overlap_factor` 0.25: latent tiles of 4 every 3, blended over 8
                               pixels, cropped to 24
  image_bf16    [B, 3, 8h, 8w] `image` with the model and the latents in bfloat16 (the transform too),
                               upcast to f32: the reference's own bf16 drift
  pil           uint8 [B, 8h, 8w, 3]  `VaeImageProcessor(vae_scale_factor=8).postprocess(image,
                               output_type="pil")` stacked back with `np.asarray`: the pixels the
                               pipeline would save

cases/postprocess.safetensors:
  image         [1, 3, 16, 32] values chosen to exercise the rounding: a ramp over [-1.2, 1.2] and the
                               f32 values x (searched within 4 ulps of each (k + 0.5)/255) whose
                               `(x * 0.5 + 0.5) * 255` lands exactly on k + 0.5 in f32 (numpy rounds
                               those half to even; `f32::round` would round them away from zero)
  pil           uint8 [1, 16, 32, 3]  its postprocess as above

Numbers this script prints (the run that produced the committed files)
---------------------------------------------------------------------
  square:    image [2, 3, 64, 64], max|image| 2.094, 1.1% of values outside [-1, 1];
             tiled vs untiled max diff 2.2151 (mean 0.2171); sliced vs batched 4.9e-06 (torch on
             the CPU is not batch-invariant); bf16 vs f32 max diff 0.0520
  nonsquare: image [1, 3, 48, 80], max|image| 1.673; tiled vs untiled max diff 1.6600 (mean
             0.1990); bf16 vs f32 max diff 0.0435. Its last tile column is one latent pixel wide.
  postprocess: 192 exact .5 ties, 105 of which half-away-from-zero rounding would get wrong
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

import diffusers
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import golden_util  # noqa: E402  (tests/golden/golden_util.py)

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "model"
CASES_DIR = HERE / "cases"

MODEL_SEED = 20250301
TILE_LATENT = 4

# The FLUX.1 VAE config (black-forest-labs/FLUX.1-dev, vae/config.json; HiDream-I1 ships the same),
# with tiny widths.
CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 16, 32, 32],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    latents_mean=None,
    latents_std=None,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)

CASES = [
    dict(name="square", seed=1, latents=(2, 16, 8, 8)),
    dict(name="nonsquare", seed=2, latents=(1, 16, 6, 10)),
]


def build_model() -> AutoencoderKL:
    torch.manual_seed(MODEL_SEED)
    vae = AutoencoderKL(**CONFIG)
    with torch.no_grad():
        for name, module in vae.named_modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1 + 0.1 * torch.randn_like(module.weight))
                module.bias.copy_(0.1 * torch.randn_like(module.bias))
    vae.eval()
    return vae


def decode(vae: AutoencoderKL, latents: torch.Tensor, tiled: bool = False, sliced: bool = False) -> torch.Tensor:
    """`latents / scaling_factor + shift_factor`, then `vae.decode(...).sample`, as the pipeline does."""
    vae.disable_tiling()
    vae.disable_slicing()
    if tiled:
        vae.enable_tiling()
        vae.tile_latent_min_size = TILE_LATENT
        vae.tile_sample_min_size = TILE_LATENT * 2 ** (len(CONFIG["block_out_channels"]) - 1)
        vae.tile_overlap_factor = 0.25
    if sliced:
        vae.enable_slicing()
    with torch.no_grad():
        z = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
    vae.disable_tiling()
    vae.disable_slicing()
    return image.contiguous()


def postprocess(image: torch.Tensor) -> torch.Tensor:
    processor = VaeImageProcessor(vae_scale_factor=8)
    pils = processor.postprocess(image, output_type="pil")
    return torch.from_numpy(np.stack([np.asarray(pil) for pil in pils])).contiguous()


def rounding_case() -> tuple[torch.Tensor, int]:
    """Values whose postprocess lands exactly on .5 before rounding, plus a ramp."""
    ties = []
    for k in range(255):
        centre = np.float32((k + 0.5) / 255)
        for step in range(-4, 5):
            y = centre + np.float32(step) * np.spacing(centre)
            x = np.float32(np.float32(2) * y - np.float32(1))
            back = np.float32(np.float32(x * np.float32(0.5)) + np.float32(0.5))
            if np.float32(back * np.float32(255)) == np.float32(k + 0.5):
                ties.append(x)
    ties = sorted(set(ties))
    n = 3 * 16 * 32
    ramp = np.linspace(-1.2, 1.2, n - len(ties), dtype=np.float32)
    values = np.concatenate([np.array(ties, dtype=np.float32), ramp])
    values = np.random.default_rng(7).permutation(values)
    return torch.from_numpy(values.reshape(1, 3, 16, 32)), len(ties)


def main() -> None:
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    torch.use_deterministic_algorithms(True)
    vae = build_model()
    for name, param in vae.named_parameters():
        assert param.std() > 0 or param.numel() == 1, f"{name} is constant"

    golden_util.reset_dir(MODEL_DIR)
    golden_util.reset_dir(CASES_DIR)
    vae.to(torch.bfloat16).save_pretrained(MODEL_DIR, safe_serialization=True)
    # Compute in f32 on the bf16-rounded weights, as a port that loads the file into f32 does.
    vae = AutoencoderKL.from_pretrained(MODEL_DIR, torch_dtype=torch.float32).eval()
    vae_bf16 = AutoencoderKL.from_pretrained(MODEL_DIR, torch_dtype=torch.bfloat16).eval()

    for case in CASES:
        torch.manual_seed(case["seed"])
        latents = torch.randn(case["latents"])
        image = decode(vae, latents)
        tiled = decode(vae, latents, tiled=True)
        sliced = decode(vae, latents, sliced=True)
        pil = postprocess(image)
        image_bf16 = decode(vae_bf16, latents.to(torch.bfloat16)).float()
        tiled_vs_untiled = (tiled - image).abs().max().item()
        assert tiled_vs_untiled > 1e-3, "tiling did not happen"
        print(
            f"{case['name']}: latents {list(latents.shape)} -> image {list(image.shape)}, "
            f"max|image| {image.abs().max().item():.3f}, "
            f"clamped pixels {(image.abs() > 1).float().mean().item():.1%}, "
            f"tiled vs untiled max diff {tiled_vs_untiled:.4f} "
            f"(mean {(tiled - image).abs().mean().item():.4f}), "
            f"sliced vs batched max diff {(sliced - image).abs().max().item():.3e}, "
            f"bf16 vs f32 max diff {(image_bf16 - image).abs().max().item():.4f}"
        )
        golden_util.save_tensors(
            {"latents": latents, "image": image, "image_tiled": tiled, "image_bf16": image_bf16, "pil": pil},
            CASES_DIR / f"{case['name']}.safetensors",
        )

    image, n_ties = rounding_case()
    pil = postprocess(image)
    away = torch.floor((image * 0.5 + 0.5).clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1)
    print(f"postprocess: {n_ties} exact .5 ties; half-away-from-zero would differ on {(away != pil).sum().item()} values")
    assert (away != pil).any(), "no tie that rounds differently"
    golden_util.save_tensors({"image": image, "pil": pil}, CASES_DIR / "postprocess.safetensors")

    config = json.loads((MODEL_DIR / "config.json").read_text())
    print(f"model: {sum(p.numel() for p in vae.decoder.parameters())} decoder parameters, config {config['_class_name']}")


if __name__ == "__main__":
    main()
