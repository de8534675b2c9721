"""FLUX.1-dev pipelines with random weights, built offline.

`synthetic:tiny` is the FLUX architecture at toy size (tests, CPU demo); `synthetic:full` is the exact
FLUX.1-dev architecture (benchmarks: compute per step equals the real model's). Both keep the real VAE
geometry (scale factor 8, 16 latent channels packed 2x2), so image-size rules are the same as with real
weights. Tokenizers are built from in-memory vocabularies, so nothing is downloaded.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

# FLUX.1-dev's published configs (see DESIGN.md); "tiny" keeps every structural choice, shrinks the widths.
FULL = {
    "transformer": dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    "t5": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    "clip": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
TINY = {
    "transformer": dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    "vae": dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8),
    "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4),
    "clip": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
}
SIZES = {"tiny": TINY, "full": FULL}

CLIP_MAX_TOKENS = 77
T5_MAX_TOKENS = 512
T5_VOCAB_SIZE = 32128
CLIP_VOCAB_SIZE = 49408


def clip_tokenizer() -> CLIPTokenizer:
    """Byte-level CLIP tokenizer without merges: one token per byte, like CLIP's alphabet."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in alphabet:
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_TOKENS)


def t5_tokenizer() -> T5TokenizerFast:
    """Unigram T5 tokenizer over printable ASCII pieces (with and without the word-start marker)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for code in range(33, 127):
        pieces.append(("\u2581" + chr(code), -3.0))
        pieces.append((chr(code), -4.0))
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_TOKENS)


def _init_normal(module: torch.nn.Module, generator: torch.Generator) -> None:
    """normal(0, 0.02) for every weight: nn.Linear's default init blows activations up over 57 blocks."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:  # norm scales
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)


def build_synthetic_pipeline(size: str, dtype: torch.dtype, device: torch.device | str) -> FluxPipeline:
    """Build a FluxPipeline of the given size ("tiny" or "full") with seeded random weights on `device`."""
    cfg = SIZES[size]
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**cfg["transformer"]).to(dtype)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.3611, shift_factor=0.1159, **cfg["vae"],
        ).to(dtype)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, projection_dim=768 if size == "full" else 32, hidden_act="quick_gelu",
            max_position_embeddings=CLIP_MAX_TOKENS, **cfg["clip"],
        )).to(dtype)
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=T5_VOCAB_SIZE, feed_forward_proj="gated-gelu", is_encoder_decoder=False, **cfg["t5"],
        )).to(dtype)
    for module in (transformer, vae, text_encoder, text_encoder_2):
        _init_normal(module, generator)
        module.eval().requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer(), transformer=transformer,
    )
