"""Prompt-first truncation, checked against litgpt itself.

- The scan's prompt and response lengths are those of litgpt's ``SFTDataset`` item (its prompt is what it masks);
- a cut item holds exactly the planned pieces of the prompt and response as the tokenizer encodes them, labels masked
  as litgpt masks a prompt, never longer than the limit, the template's response marker kept;
- policy ``end`` is ``SFTDataset(max_seq_length=N)`` item for item;
- the reported case (long instructions, short answers, mask_prompt): NaN validation loss upstream, finite here.

Tokenizers: the three local ones of test_scan_exact (byte-level BPE and word-level on Hugging Face, BPE on
SentencePiece) with BOS on and off, and the two real Llama 2 ones in ../shared when present.
"""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from litgpt import GPT
from litgpt.data import SFTDataset
from litgpt.data.base import get_sft_collate_fn
from litgpt.prompts import Alpaca, Default, Llama3
from litgpt.tokenizer import Tokenizer
from litgpt.utils import chunked_cross_entropy
from test_scan_exact import TEXT, _config, _hf_bpe, _sentencepiece
from torch.utils.data import DataLoader, Subset

import assets
import data_utils
from helpers import SHARED, requires_shared, tiny_config
from litgpt_seqlen.data import scan, truncation
from litgpt_seqlen.report import printed

IGNORE = -100
STYLES = {"alpaca": Alpaca(), "llama3": Llama3(), "default": Default()}  # default: no template at all
# Template text that must stay whole in the protected head and marker: (last text of the head, the response marker).
TEMPLATE_TEXT = {
    "alpaca": ("### Instruction:", "### Response:"),
    "llama3": (
        "You are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>",
        "<|start_header_id|>assistant<|end_header_id|>",
    ),
    "default": ("", ""),
}
TOKENIZERS = [f"{n}-bos-{b}" for n in ("hf-bpe", "hf-word", "sentencepiece") for b in (True, False)]


def _template_words() -> list[str]:
    from tokenizers import pre_tokenizers

    text = " ".join(style.apply("x", input="y") for style in STYLES.values())
    return [word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory) -> dict[str, Tokenizer]:
    """{hf-bpe, hf-word, sentencepiece} x {BOS on, BOS off}; the word-level one knows every template's words."""
    root = tmp_path_factory.mktemp("trunc-tokenizers")

    def word_level(directory):
        assets.build_tokenizer(directory, extra_words=_template_words())

    built = {}
    for add_bos in (True, False):
        for name, build, tokenizer_class in (
            ("hf-bpe", _hf_bpe, "PreTrainedTokenizerFast"),
            ("hf-word", word_level, "PreTrainedTokenizerFast"),
            ("sentencepiece", _sentencepiece, "LlamaTokenizer"),
        ):
            directory = root / f"{name}-bos-{add_bos}"
            build(directory)
            _config(directory, add_bos, tokenizer_class)
            built[directory.name] = Tokenizer(directory)
    return built


def squeezed(text: str) -> str:
    return "".join(text.split())  # decoders differ in whitespace (word-level joins with spaces); tokens do not


def encoded_parts(dataset: SFTDataset, index: int) -> tuple[list[int], list[int]]:
    """The prompt and response ids as a user of litgpt would encode them (the reference for the cut pieces)."""
    example = dataset.data[index]
    prompt = dataset.prompt_style.apply(prompt=example["instruction"], **example)
    response = dataset.tokenizer.encode(example["output"], bos=False, eos=True)
    return dataset.tokenizer.encode(prompt).tolist(), response.tolist()


def litgpt_labels(ids: list[int], prompt_kept: int, mask_prompt: bool) -> list[int]:
    return [IGNORE] * prompt_kept + ids[prompt_kept:] if mask_prompt else list(ids)


SAMPLE = st.fixed_dictionaries({"instruction": TEXT, "input": st.one_of(st.just(""), TEXT), "output": TEXT})


# ---------------------------------------------------------------------------------------------------------------
# The scan
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=20, deadline=None)
@given(samples=st.lists(SAMPLE, min_size=1, max_size=4))
def test_parts_are_what_sft_dataset_encodes_and_masks(tokenizers, name, samples):
    for style_name, style in STYLES.items():
        dataset = SFTDataset(samples, tokenizers[name], prompt_style=style, mask_prompt=True)
        for i, parts in enumerate(scan.scan_parts(dataset, "train")):
            item = dataset[i]
            assert parts.length == len(item["input_ids"])
            assert parts.prompt == int((item["labels"] == IGNORE).sum())  # litgpt masks exactly its encoded prompt
            assert parts.head + parts.marker <= parts.prompt
            _assert_template_is_protected(dataset, i, parts, style_name)


def _assert_template_is_protected(dataset, index, parts, style_name) -> None:
    head_text, marker_text = TEMPLATE_TEXT[style_name]
    ids = dataset[index]["input_ids"]
    decode = dataset.tokenizer.decode
    assert squeezed(head_text) in squeezed(decode(ids[: parts.head]))
    assert squeezed(marker_text) in squeezed(decode(ids[parts.prompt - parts.marker : parts.prompt]))


def test_parts_of_hand_made_prompts(tokenizers):
    """Alpaca with and without input, llama3's system text: the user span is the user's words, nothing else."""
    tokenizer = tokenizers["hf-word-bos-True"]
    samples = [
        {"instruction": "write a short poem", "input": "", "output": "the fox"},
        {"instruction": "check the code", "input": "value after step", "output": "good"},
    ]
    for style, spans in (
        ("alpaca", ["write a short poem", "check the code ### Input : value after step"]),
        ("llama3", ["write a short poem", "check the code"]),
    ):
        dataset = SFTDataset(samples, tokenizer, prompt_style=style)
        for i, parts in enumerate(scan.scan_parts(dataset, "train")):
            ids = dataset[i]["input_ids"]
            assert tokenizer.decode(ids[parts.head : parts.prompt - parts.marker]) == spans[i]
            assert parts.response == len(samples[i]["output"].split()) + 1  # + EOS


# ---------------------------------------------------------------------------------------------------------------
# The plan, over plain numbers
# ---------------------------------------------------------------------------------------------------------------


P = data_utils.SampleParts


@pytest.mark.parametrize(
    "parts, limit, policy, kept",
    [
        (P(100, 20, 10, 5), 200, "prompt", (100, 0, 20)),  # fits: untouched
        (P(100, 20, 10, 5), 50, "prompt", (10 + 8, 5 + 7, 20)),  # 15 user tokens fit: first 8, last 7
        (P(100, 20, 10, 5), 36, "prompt", (10 + 1, 5, 20)),  # 1 user token fits: the first
        (P(100, 40, 10, 5), 50, "prompt", (10, 5, 35)),  # response too long beside the template: its end goes
        (P(100, 40, 10, 5), 12, "prompt", (12, 0, 0)),  # the template alone is too long: upstream's cut
        (P(100, 20, 10, 5), 50, "end", (50, 0, 0)),
        (P(30, 40, 10, 5), 50, "end", (30, 0, 20)),
        (P(0, 3, 0, 0), 2, "prompt", (0, 0, 2)),  # no prompt at all
    ],
)
def test_hand_computed_plans(parts, limit, policy, kept):
    plan = truncation.plan(parts, limit, policy)
    assert (plan.prompt_head, plan.prompt_tail, plan.response_kept) == kept


PARTS = st.integers(0, 300).flatmap(
    lambda prompt: st.tuples(st.just(prompt), st.integers(1, 300), st.integers(0, prompt)).flatmap(
        lambda t: st.builds(P, st.just(t[0]), st.just(t[1]), st.just(t[2]), st.integers(0, t[0] - t[2]))
    )
)


@pytest.mark.e2e
@settings(max_examples=500, deadline=None)
@given(parts=PARTS, limit=st.integers(1, 700), policy=st.sampled_from(truncation.TRUNCATE_FROM))
def test_plan_invariants(parts, limit, policy):
    plan = truncation.plan(parts, limit, policy)
    positions = plan.kept_positions()
    assert len(positions) == plan.length == min(parts.length, limit)
    assert positions == sorted(set(positions)) and all(0 <= i < parts.length for i in positions)
    assert plan.prompt_cut + plan.response_cut == max(0, parts.length - limit)
    if policy == "end":
        assert positions == list(range(min(parts.length, limit)))
    elif parts.length > limit and parts.head + parts.marker <= limit:
        kept_prompt = set(positions) & set(range(parts.prompt))
        assert set(range(parts.head)) | set(range(parts.prompt - parts.marker, parts.prompt)) <= kept_prompt
        response_fits = parts.head + parts.marker + parts.response <= limit
        assert (plan.response_kept == parts.response) is response_fits
        user_start, user_end = plan.prompt_head - parts.head, plan.prompt_tail - parts.marker
        assert min(user_start, user_end) >= 0 and user_start - user_end in (0, 1)  # the middle of the user span goes
        assert not plan.eos_lost or plan.prompt_kept == parts.head + parts.marker  # the prompt is cut first


# ---------------------------------------------------------------------------------------------------------------
# The cut item
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=15, deadline=None)
@given(
    samples=st.lists(SAMPLE, min_size=1, max_size=3),
    limit=st.integers(1, 60),
    mask_prompt=st.booleans(),
    style_name=st.sampled_from(sorted(STYLES)),
)
def test_cut_items_hold_the_planned_pieces(tokenizers, name, samples, limit, mask_prompt, style_name):
    tokenizer = tokenizers[name]
    dataset = SFTDataset(samples, tokenizer, prompt_style=STYLES[style_name], mask_prompt=mask_prompt)
    parts = scan.scan_parts(dataset, "train")
    for policy in truncation.TRUNCATE_FROM:
        plans = truncation.plan_split(parts, limit, policy)
        cut = truncation.TruncatedSFT(dataset, plans)
        for i, plan in enumerate(plans):
            item = cut[i]
            prompt, response = encoded_parts(dataset, i)
            expected = (
                prompt[: plan.prompt_head] + prompt[len(prompt) - plan.prompt_tail :] + response[: plan.response_kept]
            )
            assert item["input_ids"].tolist() == expected
            assert item["labels"].tolist() == litgpt_labels(expected, plan.prompt_kept, mask_prompt)
            assert len(expected) <= limit and item["token_counts"]["raw_plus_prompt_template"] == len(expected)
            targets = int((item["labels"][1:] != IGNORE).sum())
            assert truncation.supervised_targets(plan, mask_prompt) == targets
            if policy == "prompt" and parts[i].head + parts[i].marker <= limit:
                _assert_marker_kept(tokenizer, item, parts[i], plan, style_name)
                if parts[i].head + parts[i].marker + parts[i].response <= limit:
                    assert plan.response_kept == len(response)  # the whole response, with its EOS
        if policy == "end":
            _assert_equals_upstream(samples, tokenizer, STYLES[style_name], mask_prompt, limit, cut)


def _assert_marker_kept(tokenizer, item, parts, plan, style_name) -> None:
    marker_ids = item["input_ids"][plan.prompt_kept - parts.marker : plan.prompt_kept]
    assert squeezed(TEMPLATE_TEXT[style_name][1]) in squeezed(tokenizer.decode(marker_ids))


def _assert_equals_upstream(samples, tokenizer, style, mask_prompt, limit, cut) -> None:
    upstream = SFTDataset(samples, tokenizer, prompt_style=style, mask_prompt=mask_prompt, max_seq_length=limit)
    for i in range(len(samples)):
        ours, theirs = cut[i], upstream[i]
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert torch.equal(ours["labels"], theirs["labels"])
        assert ours["token_counts"] == theirs["token_counts"]


def test_response_longer_than_the_limit(tokenizers):
    tokenizer = tokenizers["hf-word-bos-True"]
    sample = {"instruction": "write a long story", "input": "", "output": " ".join(assets.WORDS * 3)}
    dataset = SFTDataset([sample], tokenizer, prompt_style="alpaca", mask_prompt=True)
    parts = scan.scan_parts(dataset, "train")
    plan = truncation.plan(parts[0], 40, "prompt")
    item = truncation.TruncatedSFT(dataset, [plan])[0]
    assert plan.prompt_kept == parts[0].head + parts[0].marker and plan.eos_lost
    assert (
        tokenizer.decode(item["input_ids"][plan.prompt_kept - parts[0].marker : plan.prompt_kept]) == "### Response :"
    )
    assert item["input_ids"][plan.prompt_kept :].tolist() == encoded_parts(dataset, 0)[1][: 40 - plan.prompt_kept]
    assert truncation.supervised_targets(plan, True) == 40 - plan.prompt_kept


# ---------------------------------------------------------------------------------------------------------------
# The learning signal and the report
# ---------------------------------------------------------------------------------------------------------------


def test_supervised_targets_by_hand():
    plan = truncation.Plan(prompt=10, response=5, prompt_head=8, prompt_tail=0, response_kept=0, max_seq_length=8)
    assert truncation.supervised_targets(plan, mask_prompt=True) == 0
    assert truncation.supervised_targets(plan, mask_prompt=False) == 7
    only_response = truncation.Plan(
        prompt=0, response=1, prompt_head=0, prompt_tail=0, response_kept=1, max_seq_length=8
    )
    assert truncation.supervised_targets(only_response, mask_prompt=True) == 0  # its one label is at position 0
    assert truncation.unsupervised([plan, only_response], mask_prompt=False) == [1]


def test_report_figures():
    parts = [P(100, 20, 10, 5), P(100, 40, 10, 5), P(300, 10, 10, 5), P(10, 5, 5, 2)]
    plans = truncation.plan_split(parts, 50, "prompt")
    kept, without_target = truncation.drop_unsupervised(range(4), plans, mask_prompt=True)
    assert (kept, without_target) == ([0, 1, 2, 3], [])
    assert truncation.truncation_stats([plans[i] for i in kept], len(without_target)) == {
        "truncated": 3,
        "prompt_tokens_cut": 70 + 85 + 260,
        "response_tokens_cut": 5,
        "responses_cut": 1,
        "eos_lost": 1,
        "unsupervised_dropped": 0,
    }
    end = truncation.plan_split(parts, 50, "end")
    kept, without_target = truncation.drop_unsupervised([0, 2, 3], end, mask_prompt=True)  # 1 left out before
    assert (kept, without_target) == ([3], [0, 2])  # their whole response is cut: never seen
    assert truncation.truncation_stats([end[i] for i in kept], len(without_target)) == {
        "truncated": 0,
        "prompt_tokens_cut": 0,
        "response_tokens_cut": 0,
        "responses_cut": 0,
        "eos_lost": 0,
        "unsupervised_dropped": 2,
    }
    assert truncation.drop_unsupervised([0, 2, 3], end, mask_prompt=False) == ([0, 2, 3], [])
    assert truncation.response_cut_share(parts, 50, "prompt") == pytest.approx(5 / 75)
    assert truncation.response_cut_share(parts, 50, "end") == pytest.approx(70 / 75)
    rows = truncation.add_response_cut(
        [{"max_seq_length": 50, "label": "chosen", "samples_cut_share": 0.75, "tokens_cut_share": 0.5}], parts
    )
    assert rows[0]["response_tokens_cut_share"] == pytest.approx(5 / 75)
    table = printed.format_what_if(rows, block_size=2048).splitlines()
    assert table[0].endswith("response tokens cut") and table[1].endswith("6.67%")


# ---------------------------------------------------------------------------------------------------------------
# The reported case: 600-word instructions, 6-word answers, limit 512, mask_prompt
# ---------------------------------------------------------------------------------------------------------------


def test_long_instructions_give_a_finite_loss_only_when_the_prompt_is_cut(tmp_path):
    assets.build_tokenizer(tmp_path)
    tokenizer = Tokenizer(tmp_path)
    words = assets.WORDS
    samples = [
        {
            "instruction": " ".join(words[(i + k) % len(words)] for k in range(600)),
            "input": "",
            "output": " ".join(words[i : i + 6]),
        }
        for i in range(4)
    ]
    dataset = SFTDataset(samples, tokenizer, prompt_style="alpaca", mask_prompt=True)
    parts = scan.scan_parts(dataset, "val")
    collate = get_sft_collate_fn(max_seq_length=512)
    vocab_size = len(json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=512, vocab_size=vocab_size, padded_vocab_size=vocab_size, n_layer=2, n_embd=32))
    model.eval()

    def validation_loss(batch) -> torch.Tensor:  # as litgpt's validate computes it
        with torch.no_grad():
            logits = model(batch["input_ids"])
        return chunked_cross_entropy(logits[..., :-1, :], batch["labels"][..., 1:], chunk_size=0)

    upstream = SFTDataset(samples, tokenizer, prompt_style="alpaca", mask_prompt=True, max_seq_length=512)
    assert torch.isnan(validation_loss(collate([upstream[i] for i in range(4)])))
    end_plans = truncation.plan_split(parts, 512, "end")
    assert truncation.unsupervised(end_plans, mask_prompt=True) == [0, 1, 2, 3]

    plans = truncation.plan_split(parts, 512, "prompt")
    assert truncation.unsupervised(plans, mask_prompt=True) == []
    loader = DataLoader(Subset(truncation.TruncatedSFT(dataset, plans), range(4)), batch_size=4, collate_fn=collate)
    batch = next(iter(loader))  # as the flow will load it
    assert batch["input_ids"].shape == (4, 512)
    assert ((batch["labels"][:, 1:] != IGNORE).sum(dim=1) == 7).all()  # 6 words + EOS, in every sample
    assert torch.isfinite(validation_loss(batch))


# ---------------------------------------------------------------------------------------------------------------
# Real tokenizers and data (../shared)
# ---------------------------------------------------------------------------------------------------------------


@requires_shared("the truncation tests on the real data with real tokenizers")
@pytest.mark.parametrize("tokenizer_name", ("llama2-hf", "llama2-sentencepiece"))
def test_real_data_with_real_tokenizers(tokenizer_name):
    tokenizer = Tokenizer(SHARED / "tokenizers" / tokenizer_name)
    samples = json.loads((SHARED / "data" / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:150]
    for style_name in ("alpaca", "llama3"):
        dataset = SFTDataset(samples, tokenizer, prompt_style=style_name, mask_prompt=True)
        parts = scan.scan_parts(dataset, "train")
        plans = truncation.plan_split(parts, 64, "prompt")
        cut = truncation.TruncatedSFT(dataset, plans)
        for i, plan in enumerate(plans):
            item = dataset[i]
            assert parts[i].length == len(item["input_ids"]) and parts[i].prompt == int(
                (item["labels"] == IGNORE).sum()
            )
            _assert_template_is_protected(dataset, i, parts[i], style_name)
            if parts[i].head + parts[i].marker <= 64:
                _assert_marker_kept(tokenizer, cut[i], parts[i], plan, style_name)
        end = truncation.TruncatedSFT(dataset, truncation.plan_split(parts, 64, "end"))
        _assert_equals_upstream(samples, tokenizer, style_name, True, 64, end)
