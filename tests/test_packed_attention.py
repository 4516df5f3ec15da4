"""The attention paths of packed rows: each equals the dense block-causal reference, the fast ones hold no T x T
tensor, the choice follows the model and the device, and a litgpt whose attention stops handing its mask to
``scaled_dot_product_attention`` is caught rather than trained on."""

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from litgpt.lora import Block
from litgpt.model import CausalSelfAttention
from test_packing import EXACT, family_config, one_by_one, packed, sample, samples_and_rows, tiny_lora_gpt
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from helpers import ROOT
from litgpt_seqlen.data.packing import packed_collate
from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.model.packed_attention import SegmentMask, block_causal_mask, choose_attention, varlen_works
from litgpt_seqlen.model.packed_forward import batch_logits, check_packable


@given(
    st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=4), min_size=1, max_size=3),
    st.integers(0, 3),
    st.sampled_from([(4, 4), (4, 2), (4, 1)]),
)
def test_segments_equal_the_dense_reference(lengths, spare, heads):
    """Forward and backward, with padding after the samples, with and without grouped key/value heads."""
    width = max(sum(row) for row in lengths) + spare
    q_heads, kv_heads = heads
    generator = torch.Generator().manual_seed(len(lengths) * 31 + width)
    shapes = [(len(lengths), q_heads, width, 8)] + [(len(lengths), kv_heads, width, 8)] * 2
    q, k, v = (torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True) for shape in shapes)
    results = []
    for mask in (SegmentMask(lengths, width, "segments"), block_causal_mask(lengths, width)):
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=kv_heads != q_heads)
        grads = torch.autograd.grad(y.square().sum(), (q, k, v))
        results.append([y, *grads])
    for fast, reference in zip(*results):
        torch.testing.assert_close(fast, reference, **EXACT)


def test_lengths_that_do_not_fit_the_rows_are_refused():
    with pytest.raises(ValueError, match="do not fit rows of 5 tokens"):
        SegmentMask([[3, 4]], 5, "segments")
    mask = SegmentMask([[3]], 5, "segments")
    with pytest.raises(ValueError, match="for rows of"):
        F.scaled_dot_product_attention(*(torch.randn(1, 2, 6, 4) for _ in range(3)), attn_mask=mask)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation makes while active."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize("path", ["segments", "dense"])
def test_no_row_by_row_tensor_on_the_segments_path(path):
    """A row of 512 tokens holding 16 samples of 32: forward and backward of the whole model make no tensor of
    T x T = 262,144 elements on the segments path (the largest is 49,152: the logits); the dense path does (the test
    can fail)."""
    model = tiny_lora_gpt("llama", path, block_size=512)
    rng = random.Random(0)
    batch = packed_collate([[sample(rng, 32, 4) for _ in range(16)]])
    with LargestTensor() as seen:
        logits = batch_logits(model, batch)
        logits.square().mean().backward()
    if path == "segments":
        assert seen.largest < 512 * 512 // 4
    else:
        assert seen.largest >= 512 * 512


def test_the_path_follows_the_model():
    cpu = torch.device("cpu")
    assert choose_attention(family_config("llama"), cpu, "bf16-true") == "segments"
    assert choose_attention(family_config("gemma"), cpu, "32-true") == "dense"  # softcapped logits
    assert tiny_lora_gpt("gemma").packed_attention == "dense" and tiny_lora_gpt("phi").packed_attention == "segments"


def causal_over_the_row(self, q, k, v, mask=None):
    """A litgpt attention that no longer hands its mask on: causal over the whole row."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def test_an_attention_that_ignores_its_mask_is_caught(monkeypatch):
    """If litgpt's attention stopped passing its mask to ``scaled_dot_product_attention``, samples would attend
    across each other silently; the forward counts the layers that attended within samples and refuses."""
    monkeypatch.setattr(CausalSelfAttention, "scaled_dot_product_attention", causal_over_the_row)
    model = tiny_lora_gpt("llama")
    items, rows = samples_and_rows()
    with pytest.raises(UserInputError, match="0 of 2 attention layers attended within samples.*--seq.pack false"):
        batch_logits(model, packed_collate([[items[i] for i in row] for row in rows]))


def test_the_attention_is_tried_from_the_config_before_any_weight(monkeypatch):
    """``check_packable`` (run before the model is built) tries one attention layer of the real config on the meta
    device: a litgpt whose attention ignores the mask is refused there, and every supported family passes."""
    from litgpt.lora import Config

    for name in ("Llama-3.1-70B", "Mixtral-8x22B-v0.1", "phi-2", "falcon-180B", "Qwen2.5-72B", "pythia-12b"):
        check_packable(Config.from_name(name, lora_r=8, lora_query=True, lora_value=True), Block)

    monkeypatch.setattr(CausalSelfAttention, "scaled_dot_product_attention", causal_over_the_row)
    with pytest.raises(UserInputError, match="0 of 1 attention layers attended within samples"):
        check_packable(family_config("llama"), Block)


def test_a_mask_used_for_anything_but_attention_fails_loudly():
    """litgpt adds the mask to softcapped scores itself: handed a ``SegmentMask`` there (which the choice never does),
    the forward raises instead of adding something that is not a mask."""
    model = tiny_lora_gpt("gemma", "segments")
    items, rows = samples_and_rows()
    with pytest.raises(UserInputError, match="reached add, not scaled_dot_product_attention.*--seq.pack false"):
        batch_logits(model, packed_collate([[items[i] for i in row] for row in rows]))


def bfloat16_paths_against_one_by_one(name: str, device: torch.device, paths: tuple[str, str]) -> None:
    """In bfloat16 on ``device``: each path's per-token losses and LoRA gradients against the samples one by one
    (as close as bfloat16 allows), and the two paths' losses against each other."""
    items, rows = samples_and_rows()
    results = {}
    for path in paths:
        model = tiny_lora_gpt(name, path).to(device, torch.bfloat16)
        results[path] = packed(model, items, rows)
    reference_losses, reference_gradients = one_by_one(model, items)
    for losses, gradients, _ in results.values():
        for loss, reference in zip(losses, reference_losses):
            torch.testing.assert_close(loss.float(), reference.float(), atol=0.1, rtol=0.05)
        for key, reference in reference_gradients.items():
            torch.testing.assert_close(gradients[key].float(), reference.float(), atol=0.1, rtol=0.1, msg=key)
    for a, b in zip(*(results[path][0] for path in paths)):
        torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_bfloat16_paths_on_cpu(name):
    """The check the CUDA test below makes of varlen, made here of the two CPU paths (the tolerances are tried)."""
    bfloat16_paths_against_one_by_one(name, torch.device("cpu"), ("segments", "dense"))


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="the varlen attention path (FlashAttention) runs on a CUDA GPU only; run this test on a machine with one",
)
@pytest.mark.parametrize("name", ["llama", "qwen2.5", "mixtral", "falcon"])
def test_varlen_on_cuda_equals_one_by_one(name):
    """bfloat16 (FlashAttention has no float32 kernel): the varlen path, chosen for bf16-true runs on CUDA, against
    the samples one by one and against the segments path on the same device."""
    device = torch.device("cuda")
    assert varlen_works(device, torch.bfloat16)
    assert choose_attention(family_config(name), device, "bf16-true") == "varlen"
    assert choose_attention(family_config(name), device, "32-true") == "segments"
    bfloat16_paths_against_one_by_one(name, device, ("varlen", "segments"))


# Run as a script on two CPU ranks: Fabric's launcher starts rank 1 by running it again with LOCAL_RANK=1.
TWO_RANKS = textwrap.dedent(
    """
    import json, sys

    root = sys.argv[1]
    sys.path[:0] = [root, root + "/tests"]
    import lightning as L
    import torch
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from litgpt_seqlen.data.packing import packed_collate
    from litgpt_seqlen.model.packed_forward import batch_logits, check_packable
    from litgpt_seqlen.devices import strategy_for
    from litgpt_seqlen.training.loss import micro_batch_loss_sum
    from test_packing import samples_and_rows, tiny_lora_gpt

    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy_for(2, 1), precision="32-true")
    fabric.launch()
    model = fabric.setup_module(tiny_lora_gpt("llama"))
    gpt = model.module
    items, rows = samples_and_rows()
    batch = packed_collate([[items[i] for i in row] for row in rows])

    def lora_gradients():
        gradients = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return gradients

    results = {}
    for path in ("segments", "dense"):
        gpt.packed_attention = path
        fabric.backward(micro_batch_loss_sum(batch_logits(model, batch), batch["labels"])[0])
        results[path] = lora_gradients()
    total = 0
    for item in items:
        logits = model(item["input_ids"][None])[0]
        total = total + torch.nn.functional.cross_entropy(logits[:-1], item["labels"][1:], reduction="sum")
    fabric.backward(total)
    reference = lora_gradients()
    if fabric.global_rank == 0:
        print(json.dumps({
            "checkpointed": all(isinstance(block, CheckpointWrapper) for block in gpt.transformer.h),
            "gradients": len(reference),
            "difference": {
                path: max((g[n] - reference[n]).abs().max().item() for n in reference) for path, g in results.items()
            },
            "largest": max(g.abs().max().item() for g in reference.values()),
        }))
    """
)


@pytest.mark.e2e
def test_two_ranks_with_the_runs_strategy_train_packed_rows_as_one_by_one(tmp_path):
    """Under the strategy several devices use (FSDP sharding, each block in an activation-checkpointing wrapper that
    recomputes its forward in the backward), both paths' LoRA gradients equal those of the samples one by one."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(script), str(ROOT)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["checkpointed"] and result["gradients"] > 0
    for path in ("segments", "dense"):
        assert result["difference"][path] <= 1e-5 + 1e-5 * result["largest"], result


def test_the_litgpt_the_paths_are_tested_against_is_the_one_required():
    """Raising the litgpt pin means running these tests against it and then naming it here (the messages cite it)."""
    from importlib.metadata import version

    from litgpt_seqlen.model.packed_attention import TESTED_LITGPT

    assert f"litgpt=={TESTED_LITGPT}\n" in (ROOT / "requirements.txt").read_text()
    assert version("litgpt") == TESTED_LITGPT
