"""Builders for small LLaVA-family models made from transformers' own classes.

Used by ``tools/train_embedded.py`` (the shipped model) and by tests that need tiny
random-weight models of other architectures (SigLIP + Qwen2, CLIP + Mistral, ...).
Everything produced here is a plain Hugging Face directory: no project code is needed
to load it.
"""

from __future__ import annotations

from pathlib import Path

from ..data.synthetic import IMAGE_SIZE, vocabulary

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")

# The LLaVA-1.5 conversation format ("USER: <image>\n... ASSISTANT:"), as llava-hf ships it.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<image>\n{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer(words: list[str] | None = None):
    """A word-level fast tokenizer (lower-cased, BOS prepended, left padding)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = words if words is not None else vocabulary()
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=512,
    )
    return fast


def build_processor(tokenizer, image_size: int = IMAGE_SIZE, patch_size: int = 16,
                    num_additional_image_tokens: int = 1, strategy: str = "default"):
    """A LlavaProcessor (CLIP image preprocessing at ``image_size``) with the LLaVA chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=num_additional_image_tokens,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def tiny_llava_config(tokenizer, vision: str = "clip", text: str = "llama", *,
                      image_size: int = IMAGE_SIZE, patch_size: int = 16, hidden: int = 128,
                      vision_layers: int = 4, text_layers: int = 4, heads: int = 4,
                      kv_heads: int = 2, vision_mlp: int = 512, text_mlp: int = 384,
                      vision_feature_layer: int = -1):
    """A LlavaConfig with a ``vision`` tower (clip|siglip) and ``text`` decoder (llama|qwen2|mistral)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        MistralConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision_cls = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[vision]
    vision_cfg = vision_cls(
        hidden_size=hidden, intermediate_size=vision_mlp, num_hidden_layers=vision_layers,
        num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
        projection_dim=hidden,
    )
    text_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[text]
    text_cfg = text_cls(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=text_mlp,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # SigLIP has no CLS token: every patch is an image feature ("full").
    strategy = "full" if vision == "siglip" else "default"
    n_patches = (image_size // patch_size) ** 2
    return LlavaConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n_patches,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=vision_feature_layer,
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )


def save_tiny_random_model(out_dir: str | Path, vision: str = "clip", text: str = "llama",
                           seed: int = 0, **config_kwargs) -> Path:
    """Write a random-weight tiny LLaVA-family model as a Hugging Face directory."""
    import torch
    from transformers import LlavaForConditionalGeneration

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_llava_config(tokenizer, vision=vision, text=text, **config_kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    strategy = config.vision_feature_select_strategy
    processor = build_processor(
        tokenizer,
        image_size=config.vision_config.image_size,
        patch_size=config.vision_config.patch_size,
        num_additional_image_tokens=0 if vision == "siglip" else 1,
        strategy=strategy,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


TINY_GRID_PINPOINTS = [[64, 128], [128, 64], [128, 128], [64, 192], [192, 64], [192, 192]]


def _anyres_processor(family: str, tokenizer, config, grid_pinpoints: list, aspect: str):
    """The family's own image processor + the LLaVA chat template (OneVision's without a video processor)."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor, LlavaOnevisionImageProcessor

    from ..families.llava_onevision import OnevisionImageTextProcessor

    size = config.vision_config.image_size
    if family == "llava_next":
        image = LlavaNextImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                        image_grid_pinpoints=grid_pinpoints, do_convert_rgb=True)
        return LlavaNextProcessor(image_processor=image, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
                                  vision_feature_select_strategy=config.vision_feature_select_strategy,
                                  num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    image = LlavaOnevisionImageProcessor(size={"height": size, "width": size}, image_grid_pinpoints=grid_pinpoints,
                                         do_convert_rgb=True)
    return OnevisionImageTextProcessor(image, tokenizer, num_image_tokens=(size // config.vision_config.patch_size) ** 2,
                                       vision_feature_select_strategy="full", vision_aspect_ratio=aspect,
                                       chat_template=LLAVA_CHAT_TEMPLATE)


def save_tiny_anyres_model(out_dir: str | Path, family: str = "llava_next", seed: int = 0,
                           grid_pinpoints: list | None = None, vision_aspect_ratio: str = "anyres_max_2",
                           **config_kwargs) -> Path:
    """A random-weight tiny LLaVA-NeXT (CLIP + Llama) or LLaVA-OneVision (SigLIP + Qwen2) HF directory.

    64-pixel tiles of 4x4 patches on a grid up to 3x3 tiles; OneVision's patch budget
    (``anyres_max_2``) is small enough that 2x2 grids are bilinearly shrunk, as 7x7 grids are
    under the real ``anyres_max_9``.
    """
    import torch
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    out, tokenizer = Path(out_dir), build_tokenizer()
    pins = grid_pinpoints or TINY_GRID_PINPOINTS
    vision, text = ("clip", "llama") if family == "llava_next" else ("siglip", "qwen2")
    base = tiny_llava_config(tokenizer, vision=vision, text=text, **config_kwargs)
    common = {"vision_config": base.vision_config.to_dict(), "text_config": base.text_config.to_dict(),
              "image_token_index": base.image_token_index, "image_grid_pinpoints": pins,
              "vision_feature_select_strategy": base.vision_feature_select_strategy,
              "vision_feature_layer": base.vision_feature_layer, "projector_hidden_act": "gelu"}
    if family == "llava_next":
        config = LlavaNextConfig(**common, image_seq_length=base.image_seq_length, pad_token_id=tokenizer.pad_token_id)
        model_cls = LlavaNextForConditionalGeneration
    else:
        config = LlavaOnevisionConfig(**common, vision_aspect_ratio=vision_aspect_ratio)
        model_cls = LlavaOnevisionForConditionalGeneration
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(out)
    _anyres_processor(family, tokenizer, config, pins, vision_aspect_ratio).save_pretrained(out)
    return out
