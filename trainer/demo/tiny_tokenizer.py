"""A tiny Qwen2 tokenizer, trained offline, for the random-weight test pipeline.

The real Qwen2.5-VL tokenizer has 151k tokens; a text encoder with hidden size 32 would spend
almost all its weights on that embedding. This one is a byte-level BPE with Qwen2's exact
pre-tokenizer and special tokens, trained on the edit pipelines' system prompt and a few edit
instructions, so it is a few hundred tokens but splits the prompt templates the way Qwen does:
the system prefix is exactly the 64 tokens the pipelines drop (`prompt_template_encode_start_idx`).
"""

import itertools
import json

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# The system prompt of QwenImageEditPipeline and QwenImageEditPlusPipeline (identical in both).
EDIT_SYSTEM_PROMPT = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate."
)

# Qwen2.5-VL's special tokens, in its id order (151643...); the tiny ids follow the BPE vocab.
SPECIAL_TOKENS = [
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
]

_VERBS = ["make", "turn", "change", "add", "remove", "replace", "paint", "put", "draw", "move"]
_COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "black", "white", "gray", "brown"]
_SHAPES = ["circle", "square", "triangle", "star", "heart", "stripe", "dot", "line", "box", "ring"]
_WORDS = (
    "the a an it into to with and of in on at from background object color shape size bigger smaller "
    "left right top bottom center image picture photo cat dog sky tree house car sun moon flower "
    "style light dark bright blur sharp text small large keep same rest"
).split()


def _corpus() -> list[str]:
    """Deterministic training text: the chat scaffolding, the system prompt, edit instructions."""
    lines = [
        "system\n" + EDIT_SYSTEM_PROMPT + "\nuser\n",
        "assistant\n",
        "Picture 1: Picture 2: Picture 3: ",
        " ".join(_WORDS),
    ]
    for verb, color, shape in itertools.product(_VERBS, _COLORS, _SHAPES):
        lines.append(f"{verb} the {shape} {color}. Turn the {color} {shape} into a {shape}, add a {color} one.")
    # Repeat the system prompt so its words win the frequency ties and merge fully.
    return lines + [EDIT_SYSTEM_PROMPT] * 50


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """Train the tiny byte-level BPE and wrap it as the real `transformers.Qwen2Tokenizer`.

    The trainer runs until no pair is left to merge, so every word of the corpus (all of the
    system prompt) is one token, exactly as in Qwen's 151k vocabulary.
    """
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=4096,  # an upper bound only: the corpus saturates far below it
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text encodes, no unk
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)

    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for token in SPECIAL_TOKENS:  # special ids come after the BPE vocab, as in Qwen
        vocab[token] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]

    # Same special-token roles as Qwen2.5-VL's tokenizer_config.json.
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=SPECIAL_TOKENS,
        model_max_length=131072,
        errors="replace",
    )
