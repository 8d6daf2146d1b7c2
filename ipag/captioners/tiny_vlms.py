"""Tiny random vision-language models of every family `vlm.py` explains, built offline in seconds.

Each is what a user's download is — a folder with the model's config and weights, its processor and tokenizer,
written by `save_pretrained` — only tiny (a few hundred thousand weights at most) and random, so tests, `--tiny`
and the benchmark exercise exactly the loading path and processors of the real models. `save_tiny(kind, folder)`
writes one; `TINY_KINDS` lists them.

The tokenizer is word-level, in SentencePiece's style ("▁red": a word start), with each family's special tokens
and a chat template shaped like the real one, so the prompt, the image placeholders and the answer's words are
handled as the real models' are. `initializer_range=0.2` (not transformers' 0.02) makes the output really depend on
the image, so gradient tests cannot pass vacuously (see DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (AutoModelForImageTextToText, PreTrainedTokenizerFast, ProcessorMixin,
                          PretrainedConfig)

#: Words of the tiny vocabulary: caption-like words, the default instruction's and the chat roles'.
WORDS = (
    "a an the of on in with and at to is two man woman dog cat person riding holding next top street table sky "
    "car bus bird red blue green white black picture photo large small square circle triangle describe this "
    "image one sentence what does show user assistant model question answer , . : ?"
).split()
INIT = 0.2
#: The tiny vision towers see 64-pixel inputs in 8-pixel patches: an 8 × 8 grid, fine enough to check geometry.
SIDE, PATCH = 64, 8


def word_tokenizer(specials: Sequence[str], extra: dict[str, str] | None = None, structure: Sequence[str] = (),
                   chat_template: str | None = None, words: Sequence[str] = WORDS,
                   starts_text: bool = False) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over `words`, SentencePiece-style ("▁word" starts a word, "▁" alone is a
    space before a marker, punctuation stands alone),
    with the special tokens `specials` (the first four are pad, unknown, start and end), `extra` special tokens
    named by attribute (e.g. {"image_token": "<image>"}), `structure` tokens matched verbatim ("\\n", template
    markers), and a chat template. `starts_text`: it puts the start token before every text, as OPT's and Llama's
    tokenizers do (BLIP-2's processors rely on that: their prompt is the image tokens, then the tokenized text)."""
    extra = extra or {}
    names = list(dict.fromkeys([*specials, *extra.values()]))
    vocab = {token: index for index, token in enumerate(
        dict.fromkeys([*names, *structure, "▁", *(w if _punctuation(w) else f"▁{w}" for w in words)]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.Metaspace()
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in names])
    backend.add_tokens([AddedToken(token, normalized=False, special=False) for token in structure])
    pad, unknown, start, end = specials[:4]
    if starts_text:
        backend.post_processor = processors.TemplateProcessing(single=f"{start} $A", pair=f"{start} $A $B",
                                                               special_tokens=[(start, vocab[start])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, unk_token=unknown, bos_token=start,
                                        eos_token=end, extra_special_tokens=extra, model_max_length=4096)
    tokenizer.chat_template = chat_template
    return tokenizer


def _punctuation(word: str) -> bool:
    return all(not char.isalnum() for char in word)


def _text(tokenizer: PreTrainedTokenizerFast, **overrides) -> dict:
    """A tiny decoder config's common part, for `tokenizer`'s vocabulary."""
    return dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=INIT,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id) | overrides


def _vision(**overrides) -> dict:
    """A tiny ViT config's common part (CLIP- or SigLIP-style)."""
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=SIDE,
                patch_size=PATCH, initializer_range=INIT) | overrides


# --- the families ---------------------------------------------------------------------------------------------

LLAMA_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
#: LLaVA 1.5's conversation format ("USER: <image>\n… ASSISTANT:").
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
LLAVA_STRUCTURE = ("\n", "USER:", "ASSISTANT:")


def llava() -> tuple[PretrainedConfig, ProcessorMixin]:
    """LLaVA 1.5: a CLIP tower read at its second-to-last block, an MLP projector, Llama; the photo resized (shorter
    side) and centre-cropped, as llava-hf/llava-1.5-7b-hf's processor does."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    tokenizer = word_tokenizer(LLAMA_SPECIALS, {"image_token": "<image>"}, LLAVA_STRUCTURE, LLAVA_TEMPLATE)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**_vision()), text_config=LlamaConfig(**_text(tokenizer)),
                         image_token_index=tokenizer.image_token_id, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", initializer_range=INIT)
    images = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    return config, LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=LLAVA_TEMPLATE)


QWEN_SPECIALS = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"]
QWEN_EXTRA = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_bos_token": "<|vision_start|>",
              "vision_eos_token": "<|vision_end|>"}
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _qwen(version: str) -> tuple[PretrainedConfig, ProcessorMixin]:
    """Qwen2-VL or Qwen2.5-VL: the photo resized to multiples of 16 px (8-px patches, 2 × 2 merged into one
    token) within a pixel budget, patchified by the processor; the language model's rotary positions in 3-D."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = word_tokenizer(QWEN_SPECIALS, QWEN_EXTRA, ("\n",), QWEN_TEMPLATE)
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=PATCH, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, initializer_range=INIT)
    text = _text(tokenizer, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4})
    ids = {"image_token_id": tokenizer.image_token_id, "video_token_id": tokenizer.video_token_id,
           "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
           "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>")}
    if version == "2":
        from transformers import Qwen2VLConfig

        config = Qwen2VLConfig(vision_config=vision | {"mlp_ratio": 2}, text_config=text, **ids)
    else:
        from transformers import Qwen2_5_VLConfig

        config = Qwen2_5_VLConfig(vision_config=vision | {"intermediate_size": 64, "out_hidden_size": 32,
                                                          "window_size": 32, "fullatt_block_indexes": [1]},
                                  text_config=text, **ids)
    sizes = dict(patch_size=PATCH, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=96 * 96)
    return config, Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=QWEN_TEMPLATE)


def qwen2_vl() -> tuple[PretrainedConfig, ProcessorMixin]:
    return _qwen("2")


def qwen2_5_vl() -> tuple[PretrainedConfig, ProcessorMixin]:
    return _qwen("2.5")


GEMMA_SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def paligemma() -> tuple[PretrainedConfig, ProcessorMixin]:
    """PaliGemma: SigLIP (no CLS token) on the squashed photo, Gemma with full attention over the prompt; no chat
    template: the processor writes the image tokens, <bos>, the instruction and a newline."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessor, SiglipVisionConfig

    tokenizer = word_tokenizer(GEMMA_SPECIALS, {"image_token": "<image>"}, ("\n",))
    images = SiglipImageProcessor(size={"height": SIDE, "width": SIDE})
    images.image_seq_length = (SIDE // PATCH) ** 2
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer)  # adds location tokens
    text = _text(tokenizer, vocab_size=len(tokenizer), head_dim=8)
    config = PaliGemmaConfig(vision_config=SiglipVisionConfig(**_vision(), projection_dim=32),
                             text_config=GemmaConfig(**text), image_token_index=tokenizer.image_token_id,
                             projection_dim=32, hidden_size=32)
    return config, processor


GEMMA3_EXTRA = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
GEMMA3_TEMPLATE = (
    "<bos>{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else "
    "message['role'] }}\n{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def gemma3() -> tuple[PretrainedConfig, ProcessorMixin]:
    """Gemma 3: SigLIP on the squashed photo, its 8 × 8 patches average-pooled into 4 × 4 image tokens, which the
    language model attends to bidirectionally."""
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig

    tokenizer = word_tokenizer(GEMMA_SPECIALS, GEMMA3_EXTRA, ("\n", "<start_of_turn>", "<end_of_turn>"),
                               GEMMA3_TEMPLATE)
    text = _text(tokenizer, head_dim=8, sliding_window=64, query_pre_attn_scalar=8)
    config = Gemma3Config(vision_config=SiglipVisionConfig(**_vision()), text_config=Gemma3TextConfig(**text),
                          mm_tokens_per_image=16, boi_token_index=tokenizer.boi_token_id,
                          eoi_token_index=tokenizer.eoi_token_id, image_token_index=tokenizer.image_token_id,
                          initializer_range=INIT)
    images = Gemma3ImageProcessor(size={"height": SIDE, "width": SIDE})
    return config, Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=16,
                                   chat_template=GEMMA3_TEMPLATE)


#: Resolutions the any-resolution families choose among (two tiles side by side, stacked, or 2 × 2).
PINPOINTS = [[SIDE, 2 * SIDE], [2 * SIDE, SIDE], [2 * SIDE, 2 * SIDE]]


def llava_next() -> tuple[PretrainedConfig, ProcessorMixin]:
    """LLaVA-NeXT (1.6): the photo at the best of `PINPOINTS`, padded and cut into tiles, after a squashed
    thumbnail; the tiles' features unpadded and each row ended by a learnt newline token."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    tokenizer = word_tokenizer(LLAMA_SPECIALS, {"image_token": "<image>"}, LLAVA_STRUCTURE, LLAVA_TEMPLATE)
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(**_vision()), text_config=LlamaConfig(**_text(tokenizer)),
                             image_token_index=tokenizer.image_token_id, image_grid_pinpoints=PINPOINTS,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_seq_length=(SIDE // PATCH) ** 2, initializer_range=INIT)
    images = LlavaNextImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
                                     image_grid_pinpoints=PINPOINTS)
    return config, LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                      chat_template=LLAVA_TEMPLATE)


def llava_onevision() -> tuple[PretrainedConfig, ProcessorMixin]:
    """LLaVA-OneVision: SigLIP (no CLS token) on a squashed thumbnail and any-resolution tiles, Qwen2."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor, Qwen2Config, SiglipVisionConfig)

    tokenizer = word_tokenizer(QWEN_SPECIALS, {"image_token": "<image>", "video_token": "<video>"}, ("\n",),
                               QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>\n"))
    config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**_vision()),
                                  text_config=Qwen2Config(**_text(tokenizer)), image_grid_pinpoints=PINPOINTS,
                                  image_token_index=tokenizer.image_token_id,
                                  video_token_index=tokenizer.video_token_id, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", initializer_range=INIT)
    sizes = dict(size={"height": SIDE, "width": SIDE}, image_grid_pinpoints=PINPOINTS)
    return config, LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(**sizes), video_processor=LlavaOnevisionVideoProcessor(**sizes),
        tokenizer=tokenizer, num_image_tokens=(SIDE // PATCH) ** 2, vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template)


IDEFICS_SPECIALS = ["<|end_of_text|>", "<unk>", "<|begin_of_text|>", "<end_of_utterance>"]
IDEFICS_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
#: Idefics3's image markers: a tile's place in the grid, the thumbnail, and the fence around each.
IDEFICS_MARKERS = ("<fake_token_around_image>", "<global-img>",
                   *(f"<row_{row}_col_{column}>" for row in range(1, 7) for column in range(1, 7)))


def _idefics(smol: bool) -> tuple[PretrainedConfig, ProcessorMixin]:
    """Idefics3 or SmolVLM: the photo resized (longer side 128 px), cut into 32-px tiles in reading order after a
    squashed thumbnail, each tile's 4 × 4 patches pixel-shuffled 2 × 2 into 4 tokens, each tile's tokens after
    its row/column marker."""
    tokenizer = word_tokenizer(IDEFICS_SPECIALS, {"image_token": "<image>"},
                               ("\n", "User:", "Assistant:", *IDEFICS_MARKERS), IDEFICS_TEMPLATE)
    tile = 4 * PATCH
    vision = dict(_vision(), image_size=tile)
    sizes = dict(size={"longest_edge": 4 * tile}, max_image_size={"longest_edge": tile})
    common = dict(scale_factor=2, image_token_id=tokenizer.image_token_id, tie_word_embeddings=False)
    if smol:
        from transformers import (LlamaConfig, SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor,
                                  SmolVLMVideoProcessor)

        config = SmolVLMConfig(vision_config=vision, text_config=LlamaConfig(**_text(tokenizer)), **common)
        processor = SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**sizes), tokenizer=tokenizer,
                                     video_processor=SmolVLMVideoProcessor(**sizes), image_seq_len=4,
                                     chat_template=IDEFICS_TEMPLATE)
    else:
        from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor, LlamaConfig

        config = Idefics3Config(vision_config=vision, text_config=LlamaConfig(**_text(tokenizer)), **common)
        processor = Idefics3Processor(image_processor=Idefics3ImageProcessor(**sizes), tokenizer=tokenizer,
                                      image_seq_len=4, chat_template=IDEFICS_TEMPLATE)
    return config, processor


def idefics3() -> tuple[PretrainedConfig, ProcessorMixin]:
    return _idefics(smol=False)


def smolvlm() -> tuple[PretrainedConfig, ProcessorMixin]:
    return _idefics(smol=True)


#: BLIP-2's Q-Former reads the patches with a few learnt queries; the language model sees only the queries.
QUERIES = 8


def _qformer(hidden: int = 32) -> dict:
    return dict(vocab_size=64, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                cross_attention_frequency=1, encoder_hidden_size=32, initializer_range=INIT,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def blip2() -> tuple[PretrainedConfig, ProcessorMixin]:
    """BLIP-2: a ViT, a Q-Former whose queries cross-attend to its patches, OPT reading the queries."""
    from transformers import Blip2Config, Blip2Processor, BlipImageProcessor, OPTConfig

    tokenizer = word_tokenizer(["<pad>", "<unk>", "</s>", "<eos>"], structure=("question", "answer"), starts_text=True)
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": SIDE, "width": SIDE}),
                               tokenizer=tokenizer, num_query_tokens=QUERIES)  # adds its image token
    text = dict(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, word_embed_proj_dim=32, init_std=INIT, dropout=0.0,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    config = Blip2Config(vision_config=_vision(), qformer_config=_qformer(), text_config=OPTConfig(**text),
                         num_query_tokens=QUERIES, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         initializer_range=INIT)
    return config, processor


def instructblip() -> tuple[PretrainedConfig, ProcessorMixin]:
    """InstructBLIP: BLIP-2 whose Q-Former also reads the instruction (with its own BERT tokenizer), Llama."""
    from transformers import (BertTokenizer, BlipImageProcessor, InstructBlipConfig, InstructBlipProcessor,
                              LlamaConfig)

    tokenizer = word_tokenizer(LLAMA_SPECIALS, starts_text=True)
    bert = BertTokenizer(vocab={token: index for index, token in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}, model_max_length=64)
    processor = InstructBlipProcessor(image_processor=BlipImageProcessor(size={"height": SIDE, "width": SIDE}),
                                      tokenizer=tokenizer, qformer_tokenizer=bert, num_query_tokens=QUERIES)
    config = InstructBlipConfig(vision_config=_vision(), qformer_config=_qformer() | {"vocab_size": len(bert)},
                                text_config=LlamaConfig(**_text(tokenizer)), num_query_tokens=QUERIES,
                                image_token_index=tokenizer.convert_tokens_to_ids("<image>"), initializer_range=INIT)
    return config, processor


#: Florence-2's DaViT shrinks its input 32-fold (strides 4, 2, 2, 2): 128 pixels make a 4 × 4 grid of image tokens.
FLORENCE_SIDE = 128


def florence2() -> tuple[PretrainedConfig, ProcessorMixin]:
    """Florence-2: a DaViT (convolutional stages with window attention) on the squashed photo, the mean of its last
    stage's 4 × 4 grid and the grid itself as image tokens, before the task prompt, in a BART encoder; a BART
    decoder, which starts with </s> and is made to write <s> next (`save_tiny` sets that, as real ones have it)."""
    from transformers import BartConfig, CLIPImageProcessor, Florence2Config, Florence2Processor

    tokenizer = word_tokenizer(["<pad>", "<unk>", "<s>", "</s>"], {"image_token": "<image>"}, ())
    images = CLIPImageProcessor(size={"height": FLORENCE_SIDE, "width": FLORENCE_SIDE}, do_center_crop=False)
    images.image_seq_length = 1 + (FLORENCE_SIDE // 32) ** 2
    vision = dict(depths=(1, 1, 1, 1), embed_dim=(8, 16, 16, 32), num_heads=(2, 2, 2, 4), num_groups=(2, 2, 2, 4),
                  window_size=2, drop_path_rate=0.0, projection_dim=32, initializer_range=INIT)
    text = dict(vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                init_std=INIT, dropout=0.0, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
                forced_eos_token_id=tokenizer.eos_token_id)
    config = Florence2Config(vision_config=vision, text_config=BartConfig(**text),
                             image_token_id=tokenizer.image_token_id)
    return config, Florence2Processor(image_processor=images, tokenizer=tokenizer)


#: Every family, by the name tests and the benchmark use.
TINY_KINDS: dict[str, Callable[[], tuple[PretrainedConfig, ProcessorMixin]]] = {
    "llava": llava, "llava_next": llava_next, "llava_onevision": llava_onevision, "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl, "paligemma": paligemma, "gemma3": gemma3, "idefics3": idefics3, "smolvlm": smolvlm,
    "blip2": blip2, "instructblip": instructblip, "florence2": florence2,
}


def save_tiny(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random model of family `kind` (a `TINY_KINDS` name) and its processor into `folder`, as
    `save_pretrained` writes a real one; returns the folder."""
    config, processor = TINY_KINDS[kind]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
        with torch.no_grad():  # zero-initialised matrices (Gemma 3's projector) would cut a random model off the image
            for parameter in model.parameters():
                if parameter.dim() >= 2 and not parameter.any():
                    parameter.normal_(0.0, INIT)
    model.generation_config.max_new_tokens = 20
    model.generation_config.min_new_tokens = 2  # a random model often ends at once: nothing to explain
    if config.is_encoder_decoder:  # Florence-2's BART: </s> starts the answer, <s> is forced next
        model.generation_config.forced_bos_token_id = processor.tokenizer.bos_token_id
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
