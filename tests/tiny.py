"""Tiny models built from a config, with tokenizers trained on fixture text (no downloads)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

WORDS = (
    "a the movie film great good bad awful boring brilliant fun dull plot acting actor story "
    "love hate best worst moving slow funny charming mess masterpiece waste time script cast"
).split()


def corpus(n: int = 400) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def bert(folder: Path, hidden: int = 32, layers: int = 2) -> Path:
    """A BERT with a WordPiece tokenizer: [CLS] a [SEP] b [SEP] pair template."""
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def gpt2(folder: Path, hidden: int = 32, layers: int = 2, padding_side: str = "right") -> Path:
    """A GPT-2 with a byte-level BPE tokenizer and no pad token (as real GPT-2 ships)."""
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = __import__("tokenizers").decoders.ByteLevel()
    tok.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", padding_side=padding_side
    )
    config = GPT2Config(vocab_size=len(fast), n_embd=hidden, n_layer=layers, n_head=2, n_positions=128)
    import torch

    torch.manual_seed(0)
    GPT2Model(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def sentiment_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Separable toy sentiment data: the label follows which word list dominates."""
    import random

    rng = random.Random(seed)
    pos, neg = ["great", "good", "brilliant", "fun", "charming", "best"], ["bad", "awful", "boring", "dull", "worst"]
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = [rng.choice(pos if label == "positive" else neg) for _ in range(3)]
        words += [rng.choice(["the", "movie", "film", "plot", "acting"]) for _ in range(rng.randint(1, 5))]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def bart(folder: Path, hidden: int = 32, layers: int = 1) -> Path:
    """A BART (encoder-decoder, AutoModelForSeq2SeqLM) with a byte-level BPE tokenizer: <s> a </s>."""
    from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = __import__("tokenizers").decoders.ByteLevel()
    tok.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    config = BartConfig(
        vocab_size=len(fast),
        d_model=hidden,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=hidden * 2,
        decoder_ffn_dim=hidden * 2,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
    )
    import torch

    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def summary_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Toy summarization: the summary is the document's first three words (learnable by copying)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 10))]
        rows.append({"id": f"d{seed}-{i}", "document": " ".join(words), "summary": " ".join(words[:3])})
    return rows


def qa_rows(n: int, seed: int, min_words: int = 12, max_words: int = 60) -> list[dict]:
    """Toy SQuAD rows (HF layout): the answer is the one 'masterpiece' (sometimes 'a masterpiece')
    hidden in a context of fixture words, so a tiny model can learn where it starts and ends."""
    import random

    rng = random.Random(seed)
    filler = [w for w in WORDS if w not in ("masterpiece", "a")]
    rows = []
    for i in range(n):
        words = [rng.choice(filler) for _ in range(rng.randint(min_words, max_words))]
        at = rng.randrange(len(words))
        answer = "a masterpiece" if rng.random() < 0.3 else "masterpiece"
        words.insert(at, answer)
        context = " ".join(words)
        start = len(" ".join(words[:at])) + (1 if at else 0)
        assert context[start : start + len(answer)] == answer
        rows.append(
            {
                "id": f"q{seed}-{i}",
                "title": "toy",
                "context": context,
                "question": rng.choice(["what is the best film", "which movie is great", "the best story"]),
                "answers": {"text": [answer, "masterpiece"], "answer_start": [start, start + len(answer) - 11]},
            }
        )
    return rows
