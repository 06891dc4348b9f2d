"""Golden fixtures for the HiDream-I1 text stack (diffusers' `HiDreamImagePipeline.encode_prompt`).

How to run (from the repository root):

    ~/refenv/bin/python tests/golden/text/generate.py

It was run with Python 3.11, torch 2.15.0 (CPU, float32), diffusers 0.42.1, transformers 5.24.0,
tokenizers 0.23.3, safetensors 0.8.0. CI never runs this script: its outputs are committed, and the
Rust test (`golden.rs`) only reads them. Rerunning it rewrites everything under
`tests/golden/text/{model,llama}/` and `expected.*` from fixed seeds; on the same versions the
output is bit-identical (the `tokenizers` trainers are not deterministic run to run, so the BPE
merges come from a small trainer here and the Unigram vocabulary is built by hand). It takes about
ten seconds on CPU.

What it builds
--------------
Four tiny tokenizers built on a few sentences (`CORPUS`) with the `tokenizers` library's
normalizers, pre-tokenizers and models, wrapped as the transformers classes the pipeline uses (so
that `save_pretrained` writes `tokenizer.json`) and loaded back with `from_pretrained`:

* `tokenizer/`   CLIPTokenizer (byte-level BPE, `</w>` word suffix), special tokens LAST in the
                 vocabulary as in openai's CLIP (`<|endoftext|>` is the largest id); pad token is
                 `<|endoftext|>` (openai CLIP-L).
* `tokenizer_2/` CLIPTokenizer with another vocabulary, special tokens FIRST (ids 0 and 1) and pad
                 token `!` (as laion's CLIP-bigG).
* `tokenizer_3/` T5Tokenizer (Unigram, Metaspace), `<pad>`=0, `</s>`=1, `<unk>`=2, no extra ids.
* `llama/`       PreTrainedTokenizerFast: byte-level BPE with Llama 3's split regex, the post-processor
                 prepends `<|begin_of_text|>`, eos is `<|eot_id|>` (as in Llama-3.1-8B-Instruct); the
                 pipeline sets pad = eos.

Four tiny random models, saved with `save_pretrained` (safetensors, float32):

* `text_encoder/`   CLIPTextModelWithProjection, quick_gelu, hidden 32, 2 layers, projection 24,
                    160 positions (HiDream's CLIPs have more than 77: the pipeline feeds 128 tokens),
                    `eos_token_id` 2: transformers' legacy pooling at `input_ids.argmax(-1)`.
* `text_encoder_2/` CLIPTextModelWithProjection, gelu (erf), hidden 48, 3 layers, projection 40,
                    `eos_token_id` = the tokenizer's eos id (1): pooling at the first eos.
* `text_encoder_3/` T5EncoderModel, gated-gelu (gelu_new), d_model 32, 3 layers, 32 relative buckets,
                    max distance 128.
* `llama/`          LlamaForCausalLM, hidden 64, 4 layers, 4 heads and 2 kv heads, rope theta 500000
                    with llama3 rope scaling, saved in shards (`model.safetensors.index.json`).

Weights are re-drawn so that activations are O(1) (linear weights N(0, 1/fan_in), embeddings
N(0, 1), norm weights 1 + 0.1 N(0, 1), biases 0.1 N(0, 1)); a tolerance of 1e-4 is then ~1e-4
relative.

What it records (`expected.safetensors`, `expected.json`)
---------------------------------------------------------
For the prompts in `expected.json` (a short one, one long enough to be truncated by every tokenizer,
and the empty negative prompt), as the pipeline's own methods compute them on a
`HiDreamImagePipeline` built from these components (the pipeline object is real; `vae` and
`transformer` are None):

* `{clip_l,clip_g,t5,llama}.ids` (and `.mask` for T5 and Llama), int64: what the pipeline's tokenizer
  calls return (padding="max_length", truncation, max_length 128).
* `clip_l.text_embeds`, `clip_g.text_embeds`: `_get_clip_prompt_embeds` for each CLIP.
* `pooled`: `encode_prompt`'s pooled embeds, cat([CLIP-L, CLIP-G], -1).
* `t5`: `_get_t5_prompt_embeds`, the encoder's last hidden state with the padding mask.
* `llama`: `_get_llama3_prompt_embeds`, `hidden_states[1:]` stacked: `[4, 3, 128, 64]`.
* `pooled_bf16`, `t5_bf16`, `llama_bf16`: the same with every encoder cast to bfloat16 (weights and
  compute), stored as float32: how far the reference itself drifts in bf16.

The script asserts that `encode_prompt` (batch of the two prompts, classifier-free guidance on, the
negative prompt defaulting to "") returns exactly these slices, and (`check_masks_and_norm`) that
the T5 and Llama padding masks and Llama's final norm each move the outputs, so the Rust test
checks them.

diffusers/transformers behaviour these fixtures pin down
--------------------------------------------------------
* The CLIPs get 128 tokens (`max_length=min(max_sequence_length, 218)`), not 77, padded to 128 with
  the tokenizer's pad token, and no attention mask: only the causal mask.
* CLIP pooling: `eos_token_id == 2` in the config means the legacy `argmax` of the ids; otherwise the
  first position of `eos_token_id`.
* T5 and Llama get the tokenizer's attention mask (right padding).
* The last of Llama's `hidden_states` is `last_hidden_state`, i.e. AFTER the final RMSNorm
  (transformers' `capture_outputs(tie_last_hidden_states=True)`); the others are raw layer outputs.
"""

import math
import sys
from collections import Counter
from pathlib import Path

import diffusers
import tokenizers
import torch
import transformers
from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import golden_util  # noqa: E402  (tests/golden/golden_util.py)

ROOT = Path(__file__).resolve().parent
MAX_SEQUENCE_LENGTH = 128

# The pre-tokenizer split of transformers' CLIPTokenizer (without its special tokens) and of Llama 3.
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

CORPUS = [
    "A cat holding a sign that says hello world, photographed in soft morning light.",
    "An astronaut riding a horse on the surface of the moon, highly detailed digital painting.",
    "A bowl of ramen with a soft boiled egg, steam rising, studio photograph, 85mm lens.",
    "The quick brown fox jumps over the lazy dog while the children laugh in the garden.",
    "Portrait of an old fisherman with a white beard, dramatic lighting, oil on canvas.",
    "A futuristic city at night with neon signs reflected in the rain-soaked streets.",
    "Watercolor painting of a lighthouse on a rocky cliff during a storm at sea.",
    "Two robots playing chess in a library full of ancient books and dusty scrolls.",
]

PROMPTS = [
    'A cat holding a sign that says "Hi-Dreams.ai".',
    (
        "An extremely long and detailed prompt describing a sprawling fantasy landscape: towering "
        "crystal mountains under a violet sky, rivers of molten gold winding through emerald "
        "forests, ancient stone bridges covered in glowing moss, dragons circling the highest peaks, "
        "tiny villages with warm lanterns in every window, a caravan of merchants crossing the desert "
        "dunes at dusk, waterfalls cascading into turquoise lagoons, floating islands tethered by "
        "silver chains, a lone wanderer in a red cloak standing on a cliff edge, and, far away, the "
        "silhouette of a colossal clockwork tower whose gears turn slowly as the three moons rise; "
        "rendered as a highly detailed matte painting, cinematic lighting, volumetric fog, 8k."
    ),
    "",
]


def train_bpe(words: list[list[str]], n_merges: int) -> list[tuple[str, str]]:
    """A plain BPE trainer, deterministic (the `tokenizers` trainers are not, run to run): merge the
    most frequent adjacent pair, ties broken by the pair's text."""
    counts: Counter[tuple[str, ...]] = Counter(tuple(word) for word in words)
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in counts.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in counts.items():
            out, idx = [], 0
            while idx < len(word):
                if idx + 1 < len(word) and (word[idx], word[idx + 1]) == best:
                    out.append(word[idx] + word[idx + 1])
                    idx += 2
                else:
                    out.append(word[idx])
                    idx += 1
            merged[tuple(out)] += count
        counts = merged
    return merges


def bpe_vocab(merges: list[tuple[str, str]], suffix: str | None) -> dict[str, int]:
    """The vocabulary CLIP and Llama 3 lay out: every byte-level character (and, for CLIP, every
    character with the end-of-word suffix), then one token per merge, in merge order."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for char in alphabet:
        vocab[char] = len(vocab)
    if suffix is not None:
        for char in alphabet:
            vocab[char + suffix] = len(vocab)
    for left, right in merges:
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
    return vocab


def pre_tokenized(tok: Tokenizer) -> list[str]:
    words = []
    for text in CORPUS:
        normalized = tok.normalizer.normalize_str(text) if tok.normalizer is not None else text
        words += [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(normalized)]
    return words


def train_clip_bpe(n_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), "removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words = [[*word[:-1], word[-1] + "</w>"] for word in pre_tokenized(tok)]
    merges = train_bpe(words, n_merges)
    return bpe_vocab(merges, "</w>"), merges


def make_clip_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    vocab, merges = train_clip_bpe(250)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    clip_l = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)

    vocab, merges = train_clip_bpe(150)
    specials = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab = {**specials, **{token: idx + 2 for token, idx in vocab.items()}}
    clip_g = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77)
    return clip_l, clip_g


def make_t5_tokenizer() -> T5Tokenizer:
    """A Unigram vocabulary built by hand (deterministic): every character with and without the
    word-start marker, every corpus word, and the character pairs seen at least 3 times, scored by
    log frequency."""
    counts: Counter[str] = Counter()
    for text in CORPUS:
        for word in text.split():
            piece = "▁" + word
            counts[piece] += 1
            for char in word:
                counts[char] += 1
                counts["▁" + char] += 0
            for idx in range(len(piece) - 1):
                counts[piece[idx : idx + 2]] += 1
    total = sum(counts.values())
    pieces = sorted(
        (piece for piece, count in counts.items() if len(piece) <= 1 or piece.startswith("▁") or count >= 3),
        key=lambda piece: (-counts[piece], piece),
    )
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, math.log(max(counts[piece], 0.5) / total)) for piece in pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def make_llama_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    merges = train_bpe([list(word) for word in pre_tokenized(tok)], 250)
    tok.model = models.BPE(vocab=bpe_vocab(merges, None), merges=merges, ignore_merges=True)
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", model_max_length=131072
    )


@torch.no_grad()
def scramble(model: torch.nn.Module, seed: int) -> None:
    """Re-draws every parameter so that activations are O(1) and every tensor matters."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if param.dim() == 1 and ("norm" in name or name.endswith("layer_norm.weight")):
            if name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
        elif param.dim() == 1:
            param.copy_(0.1 * torch.randn(param.shape, generator=gen))
        elif "embed" in name or "shared" in name or "relative_attention_bias" in name:
            param.copy_(torch.randn(param.shape, generator=gen))
        else:
            param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1]))


def main() -> None:
    golden_util.quiet()
    torch.manual_seed(0)
    model_dir = golden_util.reset_dir(ROOT / "model")
    llama_dir = golden_util.reset_dir(ROOT / "llama")

    clip_l_tok, clip_g_tok = make_clip_tokenizers()
    t5_tok = make_t5_tokenizer()
    llama_tok = make_llama_tokenizer()

    clip_l = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(clip_l_tok),
            hidden_size=32,
            intermediate_size=64,
            projection_dim=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=160,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    clip_g = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(clip_g_tok),
            hidden_size=48,
            intermediate_size=96,
            projection_dim=40,
            num_hidden_layers=3,
            num_attention_heads=3,
            max_position_embeddings=160,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            bos_token_id=clip_g_tok.bos_token_id,
            eos_token_id=clip_g_tok.eos_token_id,
            pad_token_id=clip_g_tok.pad_token_id,
        )
    )
    assert clip_g.config.eos_token_id == 1
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=3,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            layer_norm_epsilon=1e-6,
            is_encoder_decoder=False,
            use_cache=False,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(llama_tok),
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            max_position_embeddings=1024,
            bos_token_id=llama_tok.bos_token_id,
            eos_token_id=llama_tok.eos_token_id,
            tie_word_embeddings=False,
        )
    )
    for seed, model in enumerate([clip_l, clip_g, t5, llama]):
        scramble(model, seed)
        model.eval()

    # Save in the Hub layout and load everything back, as a user of the real checkpoints would.
    clip_l.save_pretrained(model_dir / "text_encoder")
    clip_g.save_pretrained(model_dir / "text_encoder_2")
    t5.save_pretrained(model_dir / "text_encoder_3")
    clip_l_tok.save_pretrained(model_dir / "tokenizer")
    clip_g_tok.save_pretrained(model_dir / "tokenizer_2")
    t5_tok.save_pretrained(model_dir / "tokenizer_3")
    llama.save_pretrained(llama_dir, max_shard_size="300KB")
    llama_tok.save_pretrained(llama_dir)
    for sub in ["tokenizer", "tokenizer_2", "tokenizer_3"]:
        assert (model_dir / sub / "tokenizer.json").is_file(), sub
    assert (llama_dir / "tokenizer.json").is_file()
    assert (llama_dir / "model.safetensors.index.json").is_file()

    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=CLIPTextModelWithProjection.from_pretrained(model_dir / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(model_dir / "text_encoder_2").eval(),
        tokenizer_2=CLIPTokenizer.from_pretrained(model_dir / "tokenizer_2"),
        text_encoder_3=T5EncoderModel.from_pretrained(model_dir / "text_encoder_3").eval(),
        tokenizer_3=T5Tokenizer.from_pretrained(model_dir / "tokenizer_3"),
        text_encoder_4=LlamaForCausalLM.from_pretrained(
            llama_dir, output_hidden_states=True, output_attentions=True
        ).eval(),
        tokenizer_4=PreTrainedTokenizerFast.from_pretrained(llama_dir),
        transformer=None,
    )
    device, dtype = torch.device("cpu"), torch.float32
    n = MAX_SEQUENCE_LENGTH

    def tokens(tokenizer, max_length: int) -> dict[str, torch.Tensor]:
        out = tokenizer(
            PROMPTS,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return {"ids": out.input_ids, "mask": out.attention_mask}

    expected: dict[str, torch.Tensor] = {}
    clip_max = min(n, 218)
    for key, tok in [("clip_l", pipe.tokenizer), ("clip_g", pipe.tokenizer_2)]:
        expected[f"{key}.ids"] = tokens(tok, clip_max)["ids"]
    for key, tok in [("t5", pipe.tokenizer_3), ("llama", pipe.tokenizer_4)]:
        out = tokens(tok, min(n, tok.model_max_length))
        expected[f"{key}.ids"], expected[f"{key}.mask"] = out["ids"], out["mask"]

    with torch.no_grad():
        expected["clip_l.text_embeds"] = pipe._get_clip_prompt_embeds(
            pipe.tokenizer, pipe.text_encoder, PROMPTS, n, device, dtype
        )
        expected["clip_g.text_embeds"] = pipe._get_clip_prompt_embeds(
            pipe.tokenizer_2, pipe.text_encoder_2, PROMPTS, n, device, dtype
        )
        expected["t5"] = pipe._get_t5_prompt_embeds(PROMPTS, n, device, dtype)
        expected["llama"] = pipe._get_llama3_prompt_embeds(PROMPTS, n, device, dtype)
        t5_pos, t5_neg, llama_pos, llama_neg, pooled_pos, pooled_neg = pipe.encode_prompt(
            prompt=PROMPTS[:2], device=device, dtype=dtype, do_classifier_free_guidance=True, max_sequence_length=n
        )
    expected["pooled"] = torch.cat([expected["clip_l.text_embeds"], expected["clip_g.text_embeds"]], dim=-1)
    check_masks_and_norm(pipe, expected)

    # The same in bfloat16 (weights and compute), as a measure of the reference's own bf16 drift.
    for encoder in [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.text_encoder_4]:
        encoder.to(torch.bfloat16)
    bf16 = torch.bfloat16
    with torch.no_grad():
        pooled_bf16 = torch.cat(
            [
                pipe._get_clip_prompt_embeds(pipe.tokenizer, pipe.text_encoder, PROMPTS, n, device, bf16),
                pipe._get_clip_prompt_embeds(pipe.tokenizer_2, pipe.text_encoder_2, PROMPTS, n, device, bf16),
            ],
            dim=-1,
        )
        expected["pooled_bf16"] = pooled_bf16.float()
        expected["t5_bf16"] = pipe._get_t5_prompt_embeds(PROMPTS, n, device, bf16).float()
        expected["llama_bf16"] = pipe._get_llama3_prompt_embeds(PROMPTS, n, device, bf16).float()

    # encode_prompt must return exactly the slices recorded above (the empty prompt is the default
    # negative prompt, repeated over the batch).
    def same(actual: torch.Tensor, reference: torch.Tensor, what: str) -> None:
        worst = (actual - reference).abs().max().item()
        assert worst <= 1e-6, f"{what}: encode_prompt differs by {worst}"

    same(pooled_pos, expected["pooled"][:2], "pooled")
    same(pooled_neg, expected["pooled"][2:].repeat(2, 1), "negative pooled")
    same(t5_pos, expected["t5"][:2], "t5")
    same(t5_neg, expected["t5"][2:].repeat(2, 1, 1), "negative t5")
    same(llama_pos, expected["llama"][:, :2], "llama")
    same(llama_neg, expected["llama"][:, 2:].repeat(1, 2, 1, 1), "negative llama")

    # The fixtures must exercise what they claim to.
    assert expected["llama"].shape == (4, 3, n, 64), expected["llama"].shape
    assert expected["t5"].shape == (3, n, 32)
    for key in ["clip_l", "clip_g", "t5", "llama"]:
        ids = expected[f"{key}.ids"]
        assert ids.shape == (3, n), (key, ids.shape)
        untruncated = len(pipe_tokenizer(pipe, key)(PROMPTS[1]).input_ids)
        assert untruncated > n, f"{key}: the long prompt has only {untruncated} tokens"
    ids_l = expected["clip_l.ids"]
    assert (ids_l.argmax(-1) == (ids_l == pipe.tokenizer.eos_token_id).int().argmax(-1)).all()
    assert pipe.tokenizer_2.pad_token_id != pipe.tokenizer_2.eos_token_id
    eot = llama_tok.convert_tokens_to_ids("<|eot_id|>")
    assert pipe.tokenizer_4.pad_token_id == pipe.tokenizer_4.eos_token_id == eot
    assert expected["llama.mask"][0].sum() < n and expected["t5.mask"][0].sum() < n
    # CLIP-G (first-eos pooling) would pool elsewhere with the legacy argmax: the test tells them apart.
    ids_g = expected["clip_g.ids"]
    assert (ids_g.argmax(-1) != (ids_g == pipe.tokenizer_2.eos_token_id).int().argmax(-1)).all()

    golden_util.save_tensors(expected, ROOT / "expected.safetensors")
    meta = {
        "prompts": PROMPTS,
        "max_sequence_length": n,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "shapes": {k: list(v.shape) for k, v in sorted(expected.items())},
    }
    golden_util.write_json(ROOT / "expected.json", meta)
    for key in sorted(expected):
        value = expected[key]
        drift = ""
        if key.endswith("_bf16"):
            drift = f"  bf16 drift {(value - expected[key[: -len('_bf16')]]).abs().max().item():.3g}"
        print(f"{key:22} {list(value.shape)!s:20} max|x| {value.abs().max().item():.4g}{drift}")


@torch.no_grad()
def check_masks_and_norm(pipe: HiDreamImagePipeline, expected: dict[str, torch.Tensor]) -> None:
    """The padding masks change the outputs (so the test checks them), and the last Llama hidden
    state is the final RMSNorm of the last layer's output."""
    t5_unmasked = pipe.text_encoder_3(expected["t5.ids"])[0]
    assert (t5_unmasked - expected["t5"]).abs().max() > 1e-2

    llama = pipe.text_encoder_4
    raw = {}
    hook = llama.model.layers[-1].register_forward_hook(lambda _m, _i, out: raw.setdefault("last", out))
    unmasked = llama(expected["llama.ids"], output_hidden_states=True).hidden_states
    hook.remove()
    last = raw["last"][0] if isinstance(raw["last"], tuple) else raw["last"]
    assert (llama.model.norm(last) - unmasked[-1]).abs().max() < 1e-6
    assert (last - unmasked[-1]).abs().max() > 1e-1
    # Right padding: the real tokens never see the padding (causal), the padding rows do see the mask.
    real = expected["llama.mask"].bool()
    diff = (torch.stack(unmasked[1:]) - expected["llama"]).abs().amax(-1)
    assert diff[:, real].max() < 1e-5 and diff[:, ~real].max() > 1e-2


def pipe_tokenizer(pipe: HiDreamImagePipeline, key: str):
    tokenizers_by_key = {
        "clip_l": pipe.tokenizer,
        "clip_g": pipe.tokenizer_2,
        "t5": pipe.tokenizer_3,
        "llama": pipe.tokenizer_4,
    }
    return tokenizers_by_key[key]


if __name__ == "__main__":
    main()
