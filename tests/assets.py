"""Builds what the demo and the tests need, locally and in seconds: a tokenizer, a random-weight checkpoint, data.

    python tests/assets.py OUT_DIR   # OUT_DIR/checkpoint (model + tokenizer) and OUT_DIR/data/{train,val}.json

The tokenizer is word-level (one word or punctuation mark = one token), so a sample can be given an exact length.
The default data set reproduces the reported crash: the longest train sample has 466 tokens, the longest val one 473.
"""

import json
import random
import sys
from pathlib import Path

WORDS = (
    "the a model learns from data when every sample fits length token batch padding train val split answer "
    "question write explain list short long first second because which while after before good fast small "
    "large number text story code poem reason step check result value"
).split()
SPECIALS = ["<unk>", "<s>", "</s>"]


def build_tokenizer(directory: Path, extra_words=()) -> None:
    """A word-level Hugging Face tokenizer.json (+ tokenizer_config.json with BOS on) over the demo vocabulary."""
    from litgpt.prompts import Alpaca
    from tokenizers import Tokenizer, models, pre_tokenizers

    split_words = pre_tokenizers.Whitespace()
    templates = Alpaca().apply("x", input="y") + Alpaca().apply("x")
    template_words = {word for word, _ in split_words.pre_tokenize_str(templates)}
    vocabulary = SPECIALS + sorted(set(WORDS) | set(extra_words) | template_words | set(".,!?"))
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocabulary)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = split_words
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )


def build_checkpoint(
    directory: Path,
    block_size: int = 2048,
    n_layer: int = 2,
    n_embd: int = 32,
    seed: int = 0,
    n_head: int = 2,
    padded_vocab_size: int | None = None,
) -> None:
    """model_config.yaml + random-weight lit_model.pth of a tiny GPT, beside the tokenizer in ``directory``.
    ``padded_vocab_size`` above the tokenizer's vocabulary widens the output layer (its logits then dominate a
    micro-batch's memory)."""
    import torch
    from litgpt import GPT, Config
    from litgpt.utils import save_config

    vocab_size = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"])
    config = Config(
        name="tiny-demo",
        block_size=block_size,
        vocab_size=vocab_size,
        padded_vocab_size=padded_vocab_size or vocab_size,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        intermediate_size=2 * n_embd,
    )
    torch.manual_seed(seed)
    save_config(config, directory)
    torch.save(GPT(config).state_dict(), directory / "lit_model.pth")


def sample_tokens(sample: dict, tokenizer) -> int:
    """The sample's length as litgpt's SFTDataset (Alpaca prompt style) will tokenize it."""
    from litgpt.prompts import Alpaca

    prompt = Alpaca().apply(prompt=sample["instruction"], **sample)
    return len(tokenizer.encode(prompt)) + len(tokenizer.encode(sample["output"], bos=False, eos=True))


def sample_of_length(length: int, tokenizer, rng: random.Random, with_input: bool = False) -> dict:
    """An Alpaca-style sample whose tokenized length is exactly ``length`` (output words added one token at a time)."""
    sample = {
        "instruction": " ".join(rng.choices(WORDS, k=rng.randint(3, 8))) + "?",
        "input": " ".join(rng.choices(WORDS, k=rng.randint(2, 6))) if with_input else "",
        "output": rng.choice(WORDS),
    }
    missing = length - sample_tokens(sample, tokenizer)
    if missing < 0:
        raise ValueError(f"{length} tokens is shorter than the prompt template")
    sample["output"] += " " + " ".join(rng.choices(WORDS, k=missing)) if missing else ""
    assert sample_tokens(sample, tokenizer) == length
    return sample


def build_data(directory: Path, tokenizer_dir: Path, train_lengths, val_lengths, seed: int = 0) -> None:
    """``directory``/train.json and val.json with samples of exactly the given lengths."""
    from litgpt.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_dir)
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name, lengths in (("train", train_lengths), ("val", val_lengths)):
        samples = [sample_of_length(n, tokenizer, rng, with_input=i % 2 == 1) for i, n in enumerate(lengths)]
        (directory / f"{name}.json").write_text(json.dumps(samples, indent=1))


def demo_lengths(seed: int = 0) -> tuple[list[int], list[int]]:
    """The reported case: train tops out at 466 tokens, validation at 473."""
    rng = random.Random(seed)
    train = [rng.randint(60, 300) for _ in range(46)] + [466]
    val = [rng.randint(60, 300) for _ in range(7)] + [473]
    return train, val


def build_demo(out: Path, block_size: int = 2048) -> None:
    build_tokenizer(out / "checkpoint")
    build_checkpoint(out / "checkpoint", block_size=block_size)
    train, val = demo_lengths()
    build_data(out / "data", out / "checkpoint", train, val)


if __name__ == "__main__":
    build_demo(Path(sys.argv[1]))
    print(f"built {sys.argv[1]}/checkpoint and {sys.argv[1]}/data")
