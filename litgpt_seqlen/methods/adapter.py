"""Adapter and adapter v2: litgpt's ``finetune_adapter`` and ``finetune_adapter_v2``. A learned prefix attended to
by the later layers (v2 also a bias and scale per linear layer); final/ holds the adapter weights, as upstream's.

One difference from upstream: litgpt's adapter attention caches the prefix's keys and values on its first forward and
reuses them in every forward after, so after a forward without gradients (upstream's "Verifying settings" runs one)
the prefix embedding never trains, and after a step validation reads the keys of the weights before it. Here the
cache is emptied before every forward (``prepare``): the prefix is recomputed (a few tokens per layer) and trains.
"""

from __future__ import annotations

import litgpt.adapter as adapter_model
import litgpt.adapter_v2 as adapter_v2_model
import litgpt.finetune.adapter as upstream
import litgpt.finetune.adapter_v2 as upstream_v2

from litgpt_seqlen.methods.base import Method


def recompute_prefix(model) -> None:
    """Empties each adapter attention's prefix cache before its forward (see the module's docstring)."""

    def empty_cache(module, args) -> None:
        module.adapter_kv_cache = None

    for module in model.modules():
        if hasattr(module, "adapter_kv_cache"):
            module.register_forward_pre_hook(empty_cache)


ADAPTER = Method(
    name="adapter",
    upstream=upstream,
    config_class=adapter_model.Config,
    gpt_class=adapter_model.GPT,
    block_class=adapter_model.Block,
    weights_file="lit_model.pth.adapter",
    trainable=adapter_model.adapter_filter,
    save_weights=upstream.save_adapter_checkpoint,
    prepare=recompute_prefix,
)

ADAPTER_V2 = Method(
    name="adapter_v2",
    upstream=upstream_v2,
    config_class=adapter_v2_model.Config,
    gpt_class=adapter_v2_model.GPT,
    block_class=adapter_v2_model.Block,
    weights_file="lit_model.pth.adapter_v2",
    trainable=adapter_v2_model.adapter_filter,
    save_weights=upstream_v2.save_adapter_v2_checkpoint,
    prepare=recompute_prefix,
)
