"""Tiny pretrained-model folders for tests, saved the way hubs ship them and loaded back through
the real ``from_pretrained`` paths: nothing can be downloaded here."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def clip_tokenizer():
    """A CLIP BPE tokenizer over the byte alphabet with a few merges (the real class, a tiny vocabulary)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("o", "f</w>"), ("p", "h"), ("ph", "o")]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=merges)


def save_tiny_clip(folder: Path, seed: int = 0, image_size: int = 32, resize_side: int = 36, patch_size: int = 8) -> Path:
    """A randomly initialised ``CLIPModel`` with its tokenizer and image processor (shorter side
    ``resize_side``, centre crop ``image_size``, bicubic, OpenAI's mean and std) in ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=40, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=16, logit_scale_init_value=3.0,
    )
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": resize_side}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_sentence_encoder(folder: Path, pooling: str = "cls", seed: int = 0) -> Path:
    """A tiny BERT saved as a sentence-transformers folder declaring ``pooling`` (``1_Pooling``)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "circle", "square", "blue"]
    (folder).mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(folder)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 16, "pooling_mode_cls_token": pooling == "cls",
         "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False}))
    return folder
