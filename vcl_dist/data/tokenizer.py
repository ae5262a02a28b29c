"""Caption tokenizers: a pretrained one by name or folder, or a small WordPiece trained on the captions.

Nothing is fetched from a hub unless the user names a hub model. The trained tokenizer is a
plain ``PreTrainedTokenizerFast``: it pickles to Ray workers and saves with
``save_pretrained`` next to the model.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(captions: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A lower-casing BERT-style WordPiece tokenizer fitted to ``captions``."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tokenizer.train_from_iterator(captions, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def load_pretrained_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    # trust_remote_code stays off: a hub repository must not run code on the cluster.
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
