"""Caption tokenizers: a pretrained one by name or folder, or a small WordPiece trained on the captions.

Nothing is fetched from a hub unless the user names a hub model. The trained tokenizer is a
plain ``PreTrainedTokenizerFast``: it pickles to Ray workers and saves with
``save_pretrained`` next to the model.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(captions: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A lower-casing BERT-style WordPiece tokenizer fitted to ``captions``: the special tokens,
    the characters (initial and ``##`` continuation) by frequency, then whole words by
    frequency, up to ``vocab_size``; a word outside the vocabulary falls back to its characters.

    Deterministic — the same captions give the same vocabulary and ids in every process, ties
    broken by the token's text — where the ``tokenizers`` library's WordPiece trainer breaks
    ties in hash-map order, which differs from process to process (two runs of one config
    would train differently).
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for caption in captions:
        words.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(caption)))
    characters: Counter = Counter()
    for word, count in words.items():
        for character in word:
            characters[character] += count

    def by_frequency(counts: Counter) -> list[str]:
        return [token for token, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]

    room = max(0, vocab_size - len(SPECIAL_TOKENS))
    alphabet = by_frequency(characters)[: room // 2]
    tokens = SPECIAL_TOKENS + alphabet + [f"##{c}" for c in alphabet]
    known = set(tokens)
    tokens += [word for word in by_frequency(words) if word not in known][: max(0, vocab_size - len(tokens))]
    # "[UNK]" is a special token of the vocabulary, not a password.
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(tokens)}, unk_token="[UNK]"))  # nosec B106
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = splitter
    tokenizer.decoder = decoders.WordPiece()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",  # nosec B106
        sep_token="[SEP]", mask_token="[MASK]",
    )


def load_pretrained_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    # trust_remote_code stays off: a hub repository must not run code on the cluster.
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
