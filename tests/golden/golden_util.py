"""Helpers shared by the golden generators (`tests/golden/*/generate.py`).

Each generator imports this module by putting its folder on `sys.path`:

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import golden_util

Nothing here draws random numbers or changes torch's global state when imported, so a generator's
outputs are the same with or without it. What is here:

* files: `reset_dir`, `save_tensors` (safetensors, contiguous), `write_json` (indented, newline-ended);
* logging: `quiet` (diffusers and transformers warnings and progress bars off);
* the official code: `hdi1_scheduler_module` (one of hdi1's scheduler files, without the package
  `__init__`), `import_hdi1` (the whole package, with a CPU stand-in for `flash_attn`);
* the tiny HiDream transformers: `build_hidream_transformer` (seeded, non-trivial weights),
  `gate_margin` (how far a MoE gate's top-k choice is from a tie), `ablation_effects` (what each
  parameter tensor changes).
"""

import importlib.util
import json
import os
import shutil
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

# --------------------------------------------------------------------------------------------
# Files


def reset_dir(path):
    """Removes `path` (a folder) if it exists and creates it empty; returns it as a `Path`."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def save_tensors(tensors, path):
    """Writes `{name: tensor}` as one safetensors file, every tensor detached and contiguous."""
    save_file({name: tensor.detach().contiguous() for name, tensor in tensors.items()}, str(path))


def write_json(path, value, indent=2):
    """Writes `value` as indented JSON followed by a newline."""
    Path(path).write_text(json.dumps(value, indent=indent) + "\n")


# --------------------------------------------------------------------------------------------
# Logging


def quiet():
    """Turns off diffusers' and transformers' warnings (every `.to(dtype)` of a loaded model warns)
    and progress bars, so that a generator prints only its own summary."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# --------------------------------------------------------------------------------------------
# The official HiDream-I1 code (the PyPI package `hdi1`)


def hdi1_scheduler_module(name):
    """One of hdi1's scheduler files (`hdi1/schedulers/<name>.py`), loaded on its own: the package
    `__init__` imports the transformer, einops and flash_attn. The two scheduler files import only
    numpy, torch and diffusers."""
    root = importlib.util.find_spec("hdi1").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("hdi1_" + name, os.path.join(root, "schedulers", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_hdi1():
    """Imports the whole `hdi1` package (it needs einops). Its `__init__` imports `flash_attn`
    (CUDA only), so diffusers is imported first and a module named `flash_attn` whose
    `flash_attn_func` is torch's scaled_dot_product_attention stands in for it."""
    import diffusers  # noqa: F401  (before the stub, so that diffusers never sees it)

    def flash_attn_func(q, k, v, dropout_p=0.0, causal=False):  # [B, S, H, D], as flash_attn
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, is_causal=causal)
        return out.transpose(1, 2)

    stub = types.ModuleType("flash_attn")
    stub.flash_attn_func = flash_attn_func
    sys.modules.setdefault("flash_attn", stub)
    import hdi1

    return hdi1


# --------------------------------------------------------------------------------------------
# Tiny HiDream transformers


def build_hidream_transformer(config, seed, adaln_scale):
    """A `HiDreamImageTransformer2DModel(**config)` constructed under `torch.manual_seed(seed)`, in
    eval mode, with the parameters that start trivial re-randomised:

    * q/k RMSNorm weights (ones by default) become 1 + 0.1 * randn;
    * with nn.Linear's default init the adaLN shift/scale/gate values are ~0.1, so each block only
      nudges the residual stream and block-level mistakes barely reach `sample`; every
      adaLN_modulation linear (weight and bias) is scaled by `adaln_scale` (4 gives ~0.4: every
      block, and its text-query path, matters).

    Everything else (nn.Linear weights and biases, MoEGate weights) is random already; LayerNorms
    have no affine parameters. Asserts that no parameter tensor is constant."""
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    model = HiDreamImageTransformer2DModel(**config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.RMSNorm):
                module.weight.copy_(1.0 + 0.1 * torch.randn_like(module.weight))
        for name, module in model.named_modules():
            if name.endswith("adaLN_modulation"):
                module[1].weight.mul_(adaln_scale)
                module[1].bias.mul_(adaln_scale)
    for name, param in model.named_parameters():
        assert param.numel() > 1 and param.detach().std() > 0, f"trivial parameter {name}"
    return model.eval()


def gate_margin(gate, x, k):
    """The smallest gap between the k-th and (k+1)-th softmax score of a MoE gate over the tokens of
    `x` (the gate's input): how far the top-k expert choice of the closest token is from a tie."""
    scores = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), gate.weight).softmax(dim=-1)
    top = scores.sort(dim=-1, descending=True).values
    return (top[:, k - 1] - top[:, k]).min().item()


def ablation_effects(model, max_change):
    """For every parameter tensor of `model`: replace it by its trivial value (ones for RMSNorm
    weights, zeros otherwise), as a port that failed to load it would, call `max_change()` (the
    largest change of the recorded outputs with the model as it is now), and restore it. Returns
    `{parameter name: max_change()}`."""
    effects = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            saved = param.detach().clone()
            param.fill_(1.0 if "rms_norm" in name else 0.0)
            effects[name] = max_change()
            param.copy_(saved)
    return effects
