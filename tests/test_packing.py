"""Packed micro-batches train exactly as their samples one by one: per-token losses and LoRA gradients of a packed
forward equal those of litgpt's own ``GPT.forward`` run on each sample alone, on every attention path this machine
runs, for small models of each litgpt family's shape.

In float64, to within ``EXACT``: a packed row whose positions do not restart at each sample differs from one by one
only through the rounding of the rotary tables (RoPE is relative), by 8e-10 or more here, which float32's own
rounding (1e-6) would hide."""

import random
import re
import sys

import pytest
import torch
from litgpt.lora import GPT as LoraGPT
from litgpt.lora import Block, Config, mark_only_lora_as_trainable

from litgpt_seqlen.data.packing import packed_collate
from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.model.packed_forward import batch_logits, check_packable, packed_gpt
from litgpt_seqlen.training.loss import micro_batch_loss_sum

GPT = packed_gpt(LoraGPT)  # LoRA's GPT, whose forward also takes packed rows
# Packed against one by one in float64: rounding alone stays under 3e-15 (relative, for gradients up to 45).
EXACT = dict(atol=1e-12, rtol=1e-12)
# Where litgpt computes in float32 whatever the model's dtype, float32's rounding: its RMSNorm (the norm weights'
# gradients sum over tokens in another order) and the softmax of softcapped attention (Gemma 2).
FLOAT32_INSIDE = dict(atol=1e-5, rtol=1e-5)


def gradient_tolerance(name: str, family: str = "llama") -> dict:
    return FLOAT32_INSIDE if family == "gemma" or re.search(r"norm|ln_f", name) else EXACT


LORA = {
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "lora_query": True,
    "lora_key": True,
    "lora_value": True,
    "lora_projection": True,
    "lora_mlp": True,
    "lora_head": True,
}
TINY = dict(block_size=64, vocab_size=96, padded_vocab_size=96, n_layer=2, n_head=4, n_embd=32, **LORA)
# Each family's litgpt config, shrunk: what makes the family (norms, MLP, residual layout, rotary share and scaling,
# grouped queries, biases, softcapping, experts) is kept; only the sizes change.
FAMILIES = {
    "llama": ("Llama-3.2-1B", {"n_query_groups": 2, "intermediate_size": 64}),  # llama3 rope scaling, GQA
    "pythia": ("pythia-14m", {"n_embd": 64}),  # parallel residual, a quarter of each head rotated, LayerNorm, biases
    "falcon": ("falcon-7b", {}),  # multi-query attention, one norm shared by attention and MLP
    "qwen2.5": ("Qwen2.5-0.5B", {"n_query_groups": 2, "intermediate_size": 64}),  # biases on q, k, v only
    "phi": ("phi-2", {"n_embd": 80}),  # 40% of each head rotated, shared norm, biased head
    # both softcappings, scaled embeddings, extra norms, GemmaMLP (its windows off: those are refused)
    "gemma": (
        "Gemma-2-2b",
        {
            "n_query_groups": 2,
            "head_size": 8,
            "intermediate_size": 64,
            "attention_scores_scalar": 16,
            "attention_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
            "sliding_window_indices": [0, 0],
        },
    ),
    # a local rope base for some layers (rope_indices), norms on q and k, no softcapping
    "gemma3": (
        "Gemma-3-1b-it",
        {
            "n_query_groups": 1,
            "head_size": 8,
            "intermediate_size": 64,
            "attention_scores_scalar": 16,
            "rope_indices": [1, 0],
            "rope_local_base_freq": 100.0,
            "sliding_window_indices": [0, 0],
        },
    ),
    "mixtral": ("Mixtral-8x7B-v0.1", {"n_query_groups": 2, "intermediate_size": 64, "n_expert": 4}),  # experts
}
# The paths this machine runs for each family: every one where it is exact; softcapping only dense.
CPU_PATHS = [(name, path) for name in FAMILIES for path in ("segments", "dense") if name != "gemma" or path == "dense"]


def family_config(name: str, **changes) -> Config:
    base, shrunk = FAMILIES[name]
    return Config.from_name(base, **{**TINY, **shrunk, **changes})


def tiny_lora_gpt(name: str, packed_attention: str | None = None, dtype=torch.float64, **changes) -> GPT:
    torch.manual_seed(0)
    model = GPT(family_config(name, **changes), packed_attention).to(dtype)
    with torch.no_grad():  # LoRA's B starts at zero; random values everywhere make every gradient count
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    mark_only_lora_as_trainable(model)
    return model.train()


def sample(rng: random.Random, length: int, prompt: int, vocab: int = 96) -> dict:
    """An item as litgpt's SFTDataset makes it: labels are the ids with the prompt (``prompt`` tokens) ignored."""
    ids = torch.tensor([rng.randrange(vocab) for _ in range(length)])
    labels = ids.clone()
    labels[:prompt] = -100
    return {"input_ids": ids, "labels": labels, "token_counts": {"raw": length, "raw_plus_prompt_template": length}}


def samples_and_rows(seed: int = 0):
    rng = random.Random(seed)
    # prompt 0 is SFTDataset's mask_prompt=False: its first label is a real token, the case the collate must cut
    items = [sample(rng, n, p) for n, p in [(7, 3), (12, 0), (5, 2), (20, 8), (1, 0), (9, 0), (16, 5), (3, 1)]]
    rows = [[0, 1, 2], [3, 4], [5, 6, 7]]  # widths 24, 21, 28: the first two rows end in padding
    return items, rows


def one_by_one(model: GPT, items: list[dict]):
    """Per-token losses of each sample run alone through litgpt's GPT.forward, and the LoRA gradients of their sum."""
    model.zero_grad()
    device, losses = model.transformer.wte.weight.device, []
    for item in items:
        logits = model(item["input_ids"][None].to(device))[0]
        losses.append(
            torch.nn.functional.cross_entropy(
                logits[:-1], item["labels"][1:].to(device), reduction="none", ignore_index=-100
            )
        )
    torch.cat(losses).sum().backward()
    return [loss.detach() for loss in losses], lora_gradients(model)


def packed(model: GPT, items: list[dict], rows: list[list[int]], lm_head_chunk_size: int = 0):
    model.zero_grad()
    batch = packed_collate([[items[i] for i in row] for row in rows])
    batch = {
        key: value.to(model.transformer.wte.weight.device) if key in ("input_ids", "labels", "position_ids") else value
        for key, value in batch.items()
    }
    logits = batch_logits(model, batch, lm_head_chunk_size)
    total, count = micro_batch_loss_sum(logits, batch["labels"])
    total.backward()
    logits = torch.cat(logits, dim=1) if isinstance(logits, list) else logits
    token_losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none", ignore_index=-100
    ).detach()
    losses = {}
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            end = start + len(items[i]["input_ids"])
            losses[i] = token_losses[r, start : end - 1]  # the predictions made from this sample's tokens
            start = end
    return [losses[i] for i in range(len(items))], lora_gradients(model), count


def lora_gradients(model: GPT) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.e2e
@pytest.mark.parametrize("name, path", CPU_PATHS)
@pytest.mark.parametrize("lm_head_chunk_size", [0, 8])
def test_packed_equals_one_by_one(name, path, lm_head_chunk_size):
    model = tiny_lora_gpt(name, path)
    items, rows = samples_and_rows()
    reference_losses, reference_gradients = one_by_one(model, items)
    losses, gradients, count = packed(model, items, rows, lm_head_chunk_size)

    assert count == sum(int((item["labels"][1:] != -100).sum()) for item in items)
    for reference, loss in zip(reference_losses, losses):
        torch.testing.assert_close(loss, reference, **(FLOAT32_INSIDE if name == "gemma" else EXACT))
    assert gradients.keys() == reference_gradients.keys() and any("lora_A" in k for k in gradients)
    for key, reference in reference_gradients.items():
        assert reference.abs().sum() > 0, key  # every LoRA weight takes part
        torch.testing.assert_close(gradients[key], reference, **gradient_tolerance(key, name), msg=key)


def losses_with_positions_along_the_row(name: str, monkeypatch) -> tuple[list, list]:
    """(one by one, packed) per-token losses of the family ``name`` when a packed row's positions are counted along
    the row instead of from each sample's start: the subtlest packing bug."""
    collate = packed_collate

    def along_the_row(rows):
        batch = collate(rows)
        batch["position_ids"] = torch.arange(batch["position_ids"].shape[1]).expand_as(batch["position_ids"])
        return batch

    monkeypatch.setattr(sys.modules[__name__], "packed_collate", along_the_row)
    model = tiny_lora_gpt(name, "dense")
    items, rows = samples_and_rows()
    reference_losses, _ = one_by_one(model, items)
    losses, _, _ = packed(model, items, rows)
    return reference_losses, losses


@pytest.mark.parametrize("name", ["llama", "pythia"])
def test_positions_that_do_not_restart_at_each_sample_are_caught(name, monkeypatch):
    """The test above can fail on positions not restarted per sample. Pythia (a quarter of each head rotated) shows it
    least."""
    reference_losses, losses = losses_with_positions_along_the_row(name, monkeypatch)
    with pytest.raises(AssertionError):
        for reference, loss in zip(reference_losses, losses):
            torch.testing.assert_close(loss, reference, **EXACT)
    # ... where float32's tolerance let it through
    for reference, loss in zip(reference_losses, losses):
        torch.testing.assert_close(loss, reference, atol=1e-5, rtol=0)


def test_without_cutting_the_first_labels_samples_would_leak():
    """The test above can fail: if a row's second sample kept its first label, the first sample's last token would
    be trained to predict it (one more target than one by one)."""
    items, rows = samples_and_rows()
    batch = packed_collate([[items[i] for i in row] for row in rows])
    assert batch["labels"][0, 7] == -100  # sample 1 (mask_prompt=False) starts at 7; its own first label was a token
    assert items[1]["labels"][0] != -100


def test_through_fabric_module_runs_the_root_call():
    """Through the module ``fabric.setup_module`` returns: the same logits, and the GPT's own call (with its hooks,
    where FSDP gathers parameters) runs."""
    import lightning as L

    model = tiny_lora_gpt("llama")
    items, rows = samples_and_rows()
    batch = packed_collate([[items[i] for i in row] for row in rows])
    expected = batch_logits(model, batch)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    wrapped = fabric.setup_module(model)
    torch.testing.assert_close(batch_logits(wrapped, batch), expected, atol=0, rtol=0)
    assert calls == [1]
    torch.testing.assert_close(wrapped(batch["input_ids"][:1, :7]), model(items[0]["input_ids"][None]))


def test_collate_hand_computed():
    a = {
        "input_ids": torch.tensor([11, 12, 13]),
        "labels": torch.tensor([-100, 12, 13]),
        "token_counts": {"raw": 2, "raw_plus_prompt_template": 3},
    }
    b = {
        "input_ids": torch.tensor([21, 22]),
        "labels": torch.tensor([21, 22]),
        "token_counts": {"raw": 2, "raw_plus_prompt_template": 2},
    }
    c = {
        "input_ids": torch.tensor([31, 32, 33, 34, 35, 36]),
        "labels": torch.tensor([-100, -100, 33, 34, 35, 36]),
        "token_counts": {"raw": 5, "raw_plus_prompt_template": 6},
    }
    batch = packed_collate([[a, b], [c]], pad_id=0)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 0], [31, 32, 33, 34, 35, 36]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22, -100], [-100, -100, 33, 34, 35, 36]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert batch["segment_lengths"] == [[3, 2], [6]]
    assert batch["token_counts"]["raw_plus_prompt_template"].flatten().tolist() == [3, 2, 6]


@pytest.mark.parametrize("name", ["Gemma-2-2b", "Gemma-3-1b-it", "Mistral-7B-v0.1", "Phi-3-mini-4k-instruct"])
def test_sliding_window_models_are_refused_from_the_config(name):
    with pytest.raises(UserInputError, match=r"--seq.pack true cannot train .*sliding-window.*--seq.pack false"):
        check_packable(Config.from_name(name), Block)


def test_refused_in_the_forward_too():
    model = GPT(family_config("llama", sliding_window_size=4, sliding_window_indices=[0, 1]))
    batch = packed_collate([[sample(random.Random(0), 5, 1)]])
    with pytest.raises(UserInputError, match="in layer\\(s\\) 1"):
        batch_logits(model, batch)


def test_a_window_in_no_layer_is_accepted():
    check_packable(family_config("llama", sliding_window_size=4, sliding_window_indices=[0, 0]), Block)
    for name in ("Llama-2-7b-hf", "pythia-160m", "gemma-2b"):
        check_packable(Config.from_name(name), Block)


def test_the_forward_rotates_by_the_given_positions():
    """The forward must not ignore ``position_ids``: with every position 0 (no rotation) the logits differ widely,
    and with the restart they equal the sample's own run."""
    model = tiny_lora_gpt("llama").eval()
    items, rows = samples_and_rows()
    batch = packed_collate([[items[i] for i in rows[0]]])
    with torch.no_grad():
        logits = batch_logits(model, batch)
        unrotated = batch_logits(model, {**batch, "position_ids": torch.zeros_like(batch["position_ids"])})
        alone = model(items[1]["input_ids"][None])
    torch.testing.assert_close(logits[:, 7:19], alone, **EXACT)
    assert not torch.allclose(unrotated[:, 7:19], alone, atol=1e-3)


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_collate_of_litgpt_sft_items(tmp_path, mask_prompt):
    """Rows of litgpt's own SFTDataset items: each sample's ids and labels in its place, only its first label
    ignored (already so when the prompt is masked), positions from 0 and one segment per sample."""
    from litgpt.data import SFTDataset
    from litgpt.prompts import Alpaca
    from litgpt.tokenizer import Tokenizer

    import assets

    assets.build_tokenizer(tmp_path)
    samples = [
        {"instruction": "write a short story", "input": "", "output": "the model learns"},
        {"instruction": "explain", "input": "the data", "output": "because every sample fits"},
        {"instruction": "list", "input": "", "output": "first second"},
    ]
    dataset = SFTDataset(samples, Tokenizer(tmp_path), prompt_style=Alpaca(), mask_prompt=mask_prompt)
    items = [dataset[i] for i in range(3)]
    batch = packed_collate([[items[0], items[1]], [items[2]]])
    start = 0
    assert batch["segment_lengths"] == [
        [len(items[0]["input_ids"]), len(items[1]["input_ids"])],
        [len(items[2]["input_ids"])],
    ]
    for item in items[:2]:
        end = start + len(item["input_ids"])
        assert batch["input_ids"][0, start:end].tolist() == item["input_ids"].tolist()
        assert batch["labels"][0, start:end].tolist() == [-100] + item["labels"][1:].tolist()
        assert batch["position_ids"][0, start:end].tolist() == list(range(end - start))
        start = end
    assert (batch["labels"][1, len(items[2]["input_ids"]) :] == -100).all()
