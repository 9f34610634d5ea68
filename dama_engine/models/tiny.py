"""Tiny, randomly initialised vision-language checkpoints built on this machine, with no hub access.

:func:`build_tiny_model` writes a directory that loads exactly like a real checkpoint::

    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)

Three families are built, each with the real model's class, processor, special tokens and chat template, only
shrunk (hidden size 64, two layers, 16 image tokens or fewer per image):

* ``llava``    - LlavaForConditionalGeneration, LLaVA-1.5 style (CLIP vision tower, 2-layer MLP projector, Llama).
* ``qwen2_vl`` - Qwen2VLForConditionalGeneration (ViT with a patch merger, M-RoPE Qwen2 language model).
* ``idefics3`` - Idefics3ForConditionalGeneration, SmolVLM style (SigLIP-like tower, pixel-shuffle connector,
  Llama), with image splitting off.

They exist so the service's embedded default, the CLI demo and the tests run real code paths end to end on a CPU
in seconds. The weights are random: what a tiny model learns shows only that training moves it.

The tokenizer is a byte-level BPE trained on :data:`BASE_CORPUS` plus the caller's ``corpus`` (the demo passes
its answers there so they tokenize into few tokens). Everything is deterministic: the same family, seed and corpus
give byte-identical weights and tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAMILIES: tuple[str, ...] = ("llava", "qwen2_vl", "idefics3")
"""The families :func:`build_tiny_model` can build."""

HIDDEN_SIZE = 64
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
INTERMEDIATE_SIZE = 128
MAX_POSITIONS = 2048
BPE_VOCAB_SIZE = 1536

# Chat templates, copied from the real checkpoints' processors (llava-hf/llava-1.5-7b-hf,
# Qwen/Qwen2-VL-2B-Instruct, HuggingFaceTB/SmolVLM-Instruct) so the tiny models exercise the same rendering:
# LLaVA-1.5 and SmolVLM take content as a list of {"type": ...} parts only; Qwen2-VL also takes a plain string.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
CHAT_TEMPLATES: dict[str, str] = {
    "llava": LLAVA_CHAT_TEMPLATE,
    "qwen2_vl": QWEN2_VL_CHAT_TEMPLATE,
    "idefics3": IDEFICS3_CHAT_TEMPLATE,
}

# English the tokenizer is trained on: the words of image descriptions, questions about images and their answers,
# and the chat templates' role words, so rendered prompts and answers take few tokens.
BASE_CORPUS: tuple[str, ...] = (
    "USER: ASSISTANT: User: Assistant: system user assistant You are a helpful assistant.",
    "USER:",
    "ASSISTANT:",
    "User:",
    "Assistant:",
    "What is in the image? Describe the image in detail. What color is the object? How many objects are there?",
    "Is there a person in the picture? Where is the cat sitting? What is the man holding? Answer briefly.",
    "Look at the photo and answer the question. Which animal is on the left? What is written on the sign?",
    "The image shows a red square on a white background.",
    "The image shows a blue circle in the middle of a green field.",
    "A small black cat is sitting on a wooden table next to a cup of coffee.",
    "A large brown dog is running across the grass in a sunny park.",
    "Two children are playing with a yellow ball on the beach near the sea.",
    "There are three apples and one orange in a bowl on the kitchen counter.",
    "A woman in a long coat is walking down a busy street in the rain.",
    "A man is riding a bicycle along a road lined with tall trees.",
    "The picture shows a city at night, with bright lights and many cars.",
    "An old house stands at the top of a hill under a cloudy sky.",
    "A plate of food with rice, vegetables and a piece of fish.",
    "The sign on the door says open, and the window is full of books.",
    "A bird with orange feathers is resting on a branch of a tree.",
    "There is no person in the image; it shows only an empty room with a chair.",
    "The bus is parked beside the station, and people are waiting to get on.",
    "A train crosses a bridge over a wide river in the mountains.",
    "Snow covers the ground, and a red car drives slowly through the village.",
    "The shapes are arranged in a grid: a triangle, a square, a circle and a star.",
    "The left half of the image is dark and the right half is light.",
    "Yes. No. Maybe. I am not sure. It is hard to tell from this picture.",
    "The answer is two. The answer is four. There is one. There are five of them.",
    "The colors are red, green, blue, yellow, purple, pink, white, black, gray and brown.",
    "Numbers: zero one two three four five six seven eight nine ten eleven twelve hundred thousand.",
    "Above, below, beside, between, behind, in front of, inside, outside, near, far, left, right, top, bottom.",
    "The chart shows that sales grew each year, with the highest value in the last quarter.",
    "The text in the image reads: welcome to the museum of modern art.",
    "A close view of a flower with white petals and a yellow center.",
    "The boat is floating on calm water while the sun sets behind the hills.",
    "Several horses are eating hay in a field surrounded by a wooden fence.",
    "A laptop, a phone and a notebook are lying on a desk by the window.",
    "The description is accurate: every object mentioned is visible in the image.",
    "The description is wrong: it mentions a dog, but the image shows a cat.",
    "This answer invents details that are not in the picture, such as a second person.",
    "The preferred answer is short, correct and mentions only what can be seen.",
    "def main(): return 0  # code, numbers 3.14 and 42, symbols: + - * / = ( ) [ ] { } < > ! ? , . ; : ' \"",
    "system",
    "user",
    "assistant",
    "Animals: cat, dog, horse, cow, sheep, goat, pig, bird, duck, chicken, fish, rabbit, mouse, bear, lion, tiger, "
    "elephant, giraffe, zebra, monkey, deer, fox, wolf, snake, frog, turtle, butterfly, bee, spider, whale.",
    "Objects: table, chair, sofa, bed, lamp, clock, door, window, wall, floor, roof, stairs, mirror, picture, "
    "book, pen, paper, bag, box, bottle, glass, plate, knife, fork, spoon, cup, bowl, umbrella, key, phone, "
    "camera, television, computer, keyboard, screen, guitar, piano, ball, kite, toy, hat, shirt, shoes, glasses.",
    "Places: kitchen, bedroom, bathroom, office, school, library, hospital, market, shop, restaurant, garden, "
    "farm, forest, desert, island, lake, river, ocean, beach, mountain, valley, bridge, tower, castle, church, "
    "stadium, airport, harbor, street, road, highway, parking lot, playground, zoo.",
    "Food: bread, cheese, butter, egg, milk, tea, juice, water, soup, salad, pizza, pasta, sandwich, burger, cake, "
    "cookie, chocolate, banana, grape, lemon, strawberry, cherry, tomato, potato, carrot, onion, corn, meat.",
    "People: man, woman, boy, girl, child, baby, player, driver, doctor, teacher, student, cook, farmer, police "
    "officer, crowd, family, friends, team; wearing, holding, carrying, looking, smiling, standing, sitting, "
    "lying, walking, running, jumping, swimming, flying, reading, writing, eating, drinking, talking, waving.",
    "Describing: big, small, tall, short, long, wide, narrow, round, flat, bright, dark, shiny, old, new, young, "
    "clean, dirty, empty, full, open, closed, wet, dry, hot, cold, soft, hard, heavy, light, striped, spotted.",
    "Vehicles and weather: car, truck, van, taxi, motorcycle, airplane, helicopter, ship, sail, wheel; sun, moon, "
    "star, cloud, rain, snow, fog, wind, storm, rainbow, sunrise, sunset, morning, afternoon, evening, night.",
    "Judging answers: the response is helpful, honest, precise, faithful, grounded and concise; the other one "
    "hallucinates, guesses, contradicts the image, repeats itself, or misses the question entirely.",
)


@dataclass(frozen=True)
class _TokenizerSpec:
    """How a family's tokenizer is laid out: trained-in special tokens first, added ones after the BPE vocab."""

    leading_special: tuple[str, ...]
    added_special: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    unk: str | None
    add_bos: bool


_TOKENIZER_SPECS: dict[str, _TokenizerSpec] = {
    # llava-hf/llava-1.5: Llama-2 vocab (<unk> 0, <s> 1, </s> 2), then <image> 32000 and <pad> 32001.
    "llava": _TokenizerSpec(
        leading_special=("<unk>", "<s>", "</s>"),
        added_special=("<image>", "<pad>"),
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
    ),
    # Qwen2-VL: byte-level BPE, then <|endoftext|> 151643, <|im_start|> ... <|video_pad|> 151656; no BOS added.
    "qwen2_vl": _TokenizerSpec(
        leading_special=(),
        added_special=(
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk=None,
        add_bos=False,
    ),
    # SmolVLM: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2, ..., then the image tokens and the row/col tags
    # (used only when image splitting is on). The chat template writes <|im_start|> itself, so no BOS is added.
    "idefics3": _TokenizerSpec(
        leading_special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        added_special=(
            "<fake_token_around_image>",
            "<image>",
            "<end_of_utterance>",
            "<global-img>",
            *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
        ),
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        pad="<|im_end|>",
        unk="<|endoftext|>",
        add_bos=False,
    ),
}


def build_tiny_model(
    family: str,
    out_dir: Path,
    *,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    hidden_size: int = HIDDEN_SIZE,
) -> Path:
    """Build a tiny random ``family`` checkpoint (model, processor, tokenizer, chat template) into ``out_dir``.

    ``corpus`` adds text to the tokenizer's training data (:data:`BASE_CORPUS` is always used). ``hidden_size``
    (``llava`` only) widens the vision tower and the language model together (MLP width twice it): at 128 the
    model has about 1M parameters besides its embeddings, enough to learn to see the shapes world
    (:mod:`dama_engine.proving.seeing_base`). Returns ``out_dir``, which then loads offline with
    ``AutoModelForImageTextToText`` and ``AutoProcessor``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")
    if hidden_size != HIDDEN_SIZE and family != "llava":
        raise ValueError(f"hidden_size: only the llava tiny model takes another width than {HIDDEN_SIZE}")
    import torch  # deferred, so reading FAMILIES or the templates does not import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(family, [*BASE_CORPUS, *(corpus or ())])
    processor = _build_processor(family, tokenizer)
    config = _build_config(family, tokenizer, hidden_size)
    # Seed a private RNG stream so the caller's global torch RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(family)(config)
    model.eval()
    _set_generation_ids(model, tokenizer)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _build_tokenizer(family: str, texts: list[str]) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = _TOKENIZER_SPECS[family]
    backend = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in spec.leading_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Sorted, de-duplicated input: the trained merges depend only on the set of texts, not their order.
    backend.train_from_iterator(sorted(set(texts)), trainer=trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.added_special])
    if spec.add_bos:
        assert spec.bos is not None
        bos_id = backend.token_to_id(spec.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, bos_id)]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)

    named = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad, "unk_token": spec.unk}
    named_strings = {value for value in named.values() if value is not None}
    extra = [t for t in (*spec.leading_special, *spec.added_special) if t not in named_strings]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **named,
        extra_special_tokens=extra,
        add_bos_token=spec.add_bos,
        add_eos_token=False,
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def _build_processor(family: str, tokenizer: Any) -> Any:
    chat_template = CHAT_TEMPLATES[family]
    if family == "llava":
        from transformers import CLIPImageProcessor, LlavaProcessor

        image_processor = CLIPImageProcessor(
            size={"shortest_edge": _LLAVA_IMAGE_SIZE},
            crop_size={"height": _LLAVA_IMAGE_SIZE, "width": _LLAVA_IMAGE_SIZE},
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=_LLAVA_PATCH_SIZE,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # the CLS token, which the "default" strategy then drops
            chat_template=chat_template,
            image_token="<image>",
        )
    if family == "qwen2_vl":
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        size = {"shortest_edge": _QWEN_MIN_PIXELS, "longest_edge": _QWEN_MAX_PIXELS}
        return Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(size=size, patch_size=_QWEN_PATCH_SIZE, merge_size=2),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(size=size, patch_size=_QWEN_PATCH_SIZE, merge_size=2),
            chat_template=chat_template,
        )
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    idefics3_image_processor = Idefics3ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": _IDEFICS3_IMAGE_SIZE},
        max_image_size={"longest_edge": _IDEFICS3_IMAGE_SIZE},
    )
    return Idefics3Processor(
        image_processor=idefics3_image_processor,
        tokenizer=tokenizer,
        image_seq_len=_IDEFICS3_IMAGE_SEQ_LEN,
        chat_template=chat_template,
    )


# LLaVA: 32 px / patch 8 = 4x4 patches (+ CLS, dropped) -> 16 image tokens.
_LLAVA_IMAGE_SIZE = 32
_LLAVA_PATCH_SIZE = 8
# Qwen2-VL: patch 14, 2x2 merge -> one token per 28x28 px; between 2x2 and 4x4 tokens depending on aspect ratio.
_QWEN_PATCH_SIZE = 14
_QWEN_MIN_PIXELS = 56 * 56
_QWEN_MAX_PIXELS = 112 * 112
# Idefics3: 64 px / patch 8 = 8x8 patches, pixel shuffle by 2 -> 16 image tokens (+ 3 wrapping tokens).
_IDEFICS3_IMAGE_SIZE = 64
_IDEFICS3_PATCH_SIZE = 8
_IDEFICS3_SCALE_FACTOR = 2
_IDEFICS3_IMAGE_SEQ_LEN = (_IDEFICS3_IMAGE_SIZE // _IDEFICS3_PATCH_SIZE) ** 2 // _IDEFICS3_SCALE_FACTOR**2


def _text_config_kwargs(tokenizer: Any, hidden_size: int = HIDDEN_SIZE) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": INTERMEDIATE_SIZE * hidden_size // HIDDEN_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }


def _build_config(family: str, tokenizer: Any, hidden_size: int = HIDDEN_SIZE) -> Any:
    if family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        vision = CLIPVisionConfig(
            hidden_size=hidden_size,
            intermediate_size=INTERMEDIATE_SIZE * hidden_size // HIDDEN_SIZE,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            image_size=_LLAVA_IMAGE_SIZE,
            patch_size=_LLAVA_PATCH_SIZE,
            projection_dim=hidden_size,
        )
        num_patches = (_LLAVA_IMAGE_SIZE // _LLAVA_PATCH_SIZE) ** 2
        return LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(**_text_config_kwargs(tokenizer, hidden_size)),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=num_patches,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            tie_word_embeddings=False,
        )
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        head_dim = HIDDEN_SIZE // NUM_HEADS
        text = _text_config_kwargs(tokenizer)
        # mrope_section splits the rotary half-dimension among (temporal, height, width); real: [16, 24, 24] of 64.
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]}
        text["max_window_layers"] = NUM_LAYERS
        text["bos_token_id"] = tokenizer.convert_tokens_to_ids("<|endoftext|>")  # as in the real config
        assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
        return Qwen2VLConfig(
            text_config=text,
            vision_config={
                "depth": NUM_LAYERS,
                "embed_dim": HIDDEN_SIZE,
                "hidden_size": HIDDEN_SIZE,  # the merger's output width, i.e. the language model's
                "num_heads": NUM_HEADS,
                "mlp_ratio": 2,
                "patch_size": _QWEN_PATCH_SIZE,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
            image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
            tie_word_embeddings=False,
        )
    from transformers import Idefics3Config, Idefics3VisionConfig, LlamaConfig

    idefics3_vision = Idefics3VisionConfig(
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        image_size=_IDEFICS3_IMAGE_SIZE,
        patch_size=_IDEFICS3_PATCH_SIZE,
    )
    return Idefics3Config(
        vision_config=idefics3_vision,
        text_config=LlamaConfig(**_text_config_kwargs(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=_IDEFICS3_SCALE_FACTOR,
        tie_word_embeddings=False,
        # Deprecated top-level copy of the text config's pad id; left out, it would default to Llama-3's 128002.
        **{"pad_token_id": tokenizer.pad_token_id},
    )


def _model_class(family: str) -> Any:
    from transformers import (
        Idefics3ForConditionalGeneration,
        LlavaForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    return {
        "llava": LlavaForConditionalGeneration,
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "idefics3": Idefics3ForConditionalGeneration,
    }[family]


def _set_generation_ids(model: Any, tokenizer: Any) -> None:
    generation_config = model.generation_config
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id


def build_tiny_clip(
    *,
    image_size: int = 30,
    patch_size: int = 6,
    vision: dict[str, Any] | None = None,
    text: dict[str, Any] | None = None,
    projection_dim: int = 16,
    seed: int = 0,
) -> tuple[Any, Any]:
    """A CLIPModel with random weights and its processor, in memory (``save_pretrained`` both to get a folder that
    loads as a real CLIP scorer does). The tokenizer has one token per byte (no merges: nothing to download; a
    sub-sentence reaches CLIP's 77 tokens sooner than with real merges). By default both towers are hidden 32,
    2 layers, 2 heads; ``vision`` and ``text`` override their config fields (the benchmark gives ViT-L/14-336's)."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate([*alphabet, *(f"{c}</w>" for c in alphabet)])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    crop = {"height": image_size, "width": image_size}
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text_config = {
        **tower,
        "vocab_size": len(vocab),
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **(text or {}),
    }
    vision_config = {**tower, "image_size": image_size, "patch_size": patch_size, **(vision or {})}
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
