"""The scanned length of every sample is exactly ``len(dataset[i]["input_ids"])`` of the dataset the model trains on,
and its prompt length exactly what litgpt masks under mask_prompt.

Locally built tokenizers of both litgpt backends (Hugging Face tokenizer.json: a byte-level BPE whose post-processor
adds BOS itself, and the demo's word-level one; SentencePiece: a small BPE model with byte fallback), each with BOS on
and off, against random text; then every real sample in ../shared with the two real Llama 2 tokenizers.
"""

import io
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from litgpt.data import SFTDataset
from litgpt.tokenizer import Tokenizer

import assets
from helpers import SHARED, requires_shared
from litgpt_seqlen import errors
from litgpt_seqlen.data import scan

PROMPT_STYLES = (
    "alpaca",
    "llama2",
    "qwen3",
)  # alpaca uses `input`; the others ignore it; qwen3 adds special-looking text
CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n[INST] <<SYS>> <</SYS>> [/INST] <|im_start|>user<|im_end|>",
    "the quick brown fox jumps over the lazy dog; tabs\tand  double spaces\n\nnew lines",
    "Ünïcödé テキスト 日本語の文章 中文句子 Ελληνικά русский 🙂🚀 — “quotes” and ‘more’",
] * 20


def _config(directory, add_bos: bool, tokenizer_class: str) -> None:
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {"add_bos_token": add_bos, "bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": tokenizer_class}
        )
    )


def _hf_bpe(directory) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tokenizer = HFTokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    # Like Llama's tokenizer.json: the processor adds BOS itself, and litgpt's encode keeps or strips it.
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))


def _sentencepiece(directory) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())


@pytest.fixture(scope="session")
def local_tokenizers(tmp_path_factory) -> dict[str, Tokenizer]:
    """Six litgpt Tokenizers: {hf-bpe, hf-word, sentencepiece} x {BOS on, BOS off}."""
    root = tmp_path_factory.mktemp("tokenizers")
    built = {}
    for add_bos in (True, False):
        for name, build, tokenizer_class in (
            ("hf-bpe", _hf_bpe, "PreTrainedTokenizerFast"),
            ("hf-word", assets.build_tokenizer, "PreTrainedTokenizerFast"),
            ("sentencepiece", _sentencepiece, "LlamaTokenizer"),
        ):
            directory = root / f"{name}-bos-{add_bos}"
            build(directory)
            _config(directory, add_bos, tokenizer_class)
            tokenizer = Tokenizer(directory)
            assert tokenizer.use_bos is add_bos
            built[directory.name] = tokenizer
    assert {t.backend for t in built.values()} == {"huggingface", "sentencepiece"}
    return built


def getitem_lengths(dataset) -> list[int]:
    return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


def lengths_of(parts) -> list[int]:
    return [p.length for p in parts]


def masked_prompt_lengths(dataset) -> list[int]:
    """How many leading labels litgpt masks under mask_prompt: exactly its encoded prompt."""
    return [int((dataset[i]["labels"] == dataset.ignore_index).sum()) for i in range(len(dataset))]


WHITESPACE = st.sampled_from([" ", "  ", "\n", "\t", "\r\n", "\u3000", "\xa0", " \n "])
PIECES = st.sampled_from(
    ["<s>", "</s>", "<unk>", "### Response:", "[INST]", "<|im_end|>", "日本語", "🙂", "Ωmega", "the fox"]
)
TEXT = st.lists(
    st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=12), WHITESPACE, PIECES), max_size=8
).map("".join)
SAMPLE = st.fixed_dictionaries({"instruction": TEXT, "input": st.one_of(st.just(""), TEXT), "output": TEXT})


@pytest.mark.e2e
@pytest.mark.parametrize(
    "name", [f"{n}-bos-{b}" for n in ("hf-bpe", "hf-word", "sentencepiece") for b in (True, False)]
)
@settings(max_examples=25, deadline=None)
@given(samples=st.lists(SAMPLE, min_size=1, max_size=4))
def test_scan_equals_sft_dataset_on_random_text(local_tokenizers, name, samples):
    tokenizer = local_tokenizers[name]
    for style in PROMPT_STYLES:
        for mask_prompt in (True, False):
            dataset = SFTDataset(samples, tokenizer, prompt_style=style, mask_prompt=mask_prompt)
            parts = scan.scan_parts(dataset, "train")
            assert lengths_of(parts) == getitem_lengths(dataset), (style, mask_prompt)
            if mask_prompt:
                assert [p.prompt for p in parts] == masked_prompt_lengths(dataset), style


def test_a_transform_and_a_custom_tokenizer_are_honoured(local_tokenizers):
    tokenizer = local_tokenizers["hf-bpe-bos-True"]

    class Shouting(Tokenizer):  # a tokenizer with its own encode: the scan must use it, not litgpt's
        def encode(self, string, *args, **kwargs):
            return super().encode(string.upper() + " !!", *args, **kwargs)

    shouting = Shouting.__new__(Shouting)
    shouting.__dict__.update(tokenizer.__dict__)
    renamed = [{"question": "why is the sky blue", "answer": "light scatters"}, {"question": "", "answer": ""}]
    rename = lambda s: {"instruction": s["question"], "input": "", "output": s["answer"]}  # noqa: E731
    for tok in (tokenizer, shouting):
        dataset = SFTDataset(renamed, tok, prompt_style="alpaca", transform=rename)
        assert lengths_of(scan.scan_parts(dataset, "train")) == getitem_lengths(dataset)


def _word_samples(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choices(assets.WORDS, k=k))  # noqa: E731
    return [
        {
            "instruction": words(rng.randint(1, 20)),
            "input": words(rng.randint(0, 5)),
            "output": words(rng.randint(0, 200)),
        }
        for _ in range(count)
    ]


@pytest.mark.e2e
def test_parallel_scan_equals_serial_scan(local_tokenizers):
    dataset = SFTDataset(_word_samples(1_301), local_tokenizers["hf-word-bos-True"], prompt_style="alpaca")
    serial = scan.scan_parts(dataset, "train", workers=1)
    assert scan.scan_parts(dataset, "train", workers=2) == serial
    assert scan.scan_parts(dataset, "train", 100, 1_201, workers=2) == serial[100:1_201]
    assert lengths_of(serial[:50]) == getitem_lengths(
        SFTDataset(dataset.data[:50], dataset.tokenizer, prompt_style="alpaca")
    )


def test_parallel_scan_reports_the_bad_sample(local_tokenizers):
    samples = _word_samples(1_000)
    del samples[777]["output"]
    dataset = SFTDataset(samples, local_tokenizers["sentencepiece-bos-True"], prompt_style="alpaca")
    with pytest.raises(errors.UserInputError, match=r"val sample 777 has no field 'output'"):
        scan.scan_parts(dataset, "val", workers=2)


REAL_TOKENIZERS = ("llama2-hf", "llama2-sentencepiece")
REAL_DATA = ("alpaca_en_demo.json", "alpaca_zh_demo.json")


@requires_shared("the scan tests on the real data with real tokenizers")
@pytest.mark.parametrize("data_file", REAL_DATA)
@pytest.mark.parametrize("tokenizer_name", REAL_TOKENIZERS)
def test_every_real_sample_with_both_real_tokenizers(tokenizer_name, data_file):
    tokenizer = Tokenizer(SHARED / "tokenizers" / tokenizer_name)
    samples = json.loads((SHARED / "data" / data_file).read_text(encoding="utf-8"))
    dataset = SFTDataset(samples, tokenizer, prompt_style="alpaca", mask_prompt=True)
    expected = getitem_lengths(dataset)
    parts = scan.scan_parts(dataset, "train", workers=1)
    assert lengths_of(parts) == expected
    assert [p.prompt for p in parts] == masked_prompt_lengths(dataset)
    assert scan.scan_parts(dataset, "train", workers=2) == parts


def test_a_signal_while_the_scan_pool_starts_is_raised_not_lost():
    """A Ctrl-C that lands inside the fork (in an at-fork handler, where Python prints the exception as ignored) still
    stops the scan: it waits until the pool stands, then raises."""
    import os
    import signal

    import torch

    dataset = [{"input_ids": torch.ones(3, dtype=torch.long)} for _ in range(600)]  # 600 samples: two workers
    armed = [True]

    def interrupt_inside_the_fork():
        if armed[0]:
            armed[0] = False
            os.kill(os.getpid(), signal.SIGINT)

    os.register_at_fork(after_in_parent=interrupt_inside_the_fork)
    try:
        with pytest.raises(KeyboardInterrupt):
            scan.scan_parts(dataset, "train", workers=2)
    finally:
        armed[0] = False


class _StuckInWorkers:
    """A dataset of 600 three-token samples whose items never come in a forked worker: a stuck or lost scan worker."""

    def __init__(self, parent: int) -> None:
        self.parent = parent

    def __len__(self) -> int:
        return 600

    def __getitem__(self, index: int) -> dict:
        import os
        import time

        import torch

        if os.getpid() != self.parent:
            time.sleep(3600)
        return {"input_ids": torch.ones(3, dtype=torch.long)}


def test_a_stuck_scan_worker_costs_time_not_the_run(monkeypatch, capsys):
    import os

    monkeypatch.setattr(scan, "STALL_SECONDS", 0.2)
    parts = scan.scan_parts(_StuckInWorkers(os.getpid()), "train", workers=2)
    assert lengths_of(parts) == [3] * 600
    assert "scanning the remaining" in capsys.readouterr().err
