"""The forward pass of a litgpt GPT over packed rows, where every sample sees only itself.

litgpt's ``GPT.forward`` takes no attention mask, so this runs its modules in the same order (embedding, each
``Block``, final norm, head) with, for each token, the rotary cos/sin of its position within its own sample and an
attention mask that is causal within a sample and closed between samples. The modules are litgpt's own and are
called, not copied: LoRA layers, norms, MLPs and attention are whatever the model holds.

``check_packable(config)`` refuses, from the config alone (before a weight is read), the models this cannot run
exactly: those with sliding-window layers, whose attention replaces any mask it is given by its own window mask.
"""

from __future__ import annotations

import torch
from litgpt.model import do_softcapping

from litgpt_seqlen.errors import UserInputError


def check_packable(config) -> None:
    """Raises ``UserInputError`` when ``--seq.pack true`` cannot train ``config`` exactly as the samples one by one."""
    windowed = [i for i, on in enumerate((config.sliding_window_indices or [])[: config.n_layer]) if on]
    if config.sliding_window_size is not None and windowed:
        raise UserInputError(
            f"--seq.pack true cannot train {config.name or 'this model'}: it uses sliding-window attention"
            f" (sliding_window_size {config.sliding_window_size}, in layer(s) {', '.join(map(str, windowed[:8]))}"
            f"{' ...' if len(windowed) > 8 else ''}), and litgpt's attention replaces any mask with its window mask in"
            " those layers, so packed samples would attend to each other. Train it with --seq.pack false"
            " (--seq.group_by_length true also cuts padding)."
        )


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``(B, 1, T, T)`` booleans: token i may attend to token j when j <= i and both are in the same segment.

    Padding has a segment of its own, so every row of the mask allows at least the token itself (no empty softmax).
    """
    T = segment_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same_segment = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    return (same_segment & causal).unsqueeze(1)


def packed_forward(
    model, input_ids: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor, lm_head_chunk_size: int = 0
) -> torch.Tensor | list[torch.Tensor]:
    """Logits of packed rows, shape ``(B, T, padded_vocab_size)`` (a list of chunks along T with
    ``lm_head_chunk_size > 0``, as ``GPT.forward`` returns them).

    ``model``: a litgpt ``GPT`` (``litgpt.lora.GPT`` included) or the module ``fabric.setup_module`` returned. It is
    run through the module's own call, so Fabric's precision context and the strategy's hooks (FSDP's gathering of
    parameters) apply as they do to ``model(input_ids)``.
    """
    return _through_module_call(model, _packed_forward, input_ids, position_ids, segment_ids, lm_head_chunk_size)


def _packed_forward(gpt, input_ids, position_ids, segment_ids, lm_head_chunk_size):
    config = gpt.config
    check_packable(config)
    T = input_ids.size(1)
    if T > gpt.max_seq_length:
        raise ValueError(f"Cannot forward sequence of length {T}, max seq length is only {gpt.max_seq_length}.")
    cos, sin = gpt.cos[position_ids], gpt.sin[position_ids]  # (B, T, rope_n_elem), or (..., 2) with local rope
    mask = block_causal_mask(segment_ids)
    if config.attention_logit_softcapping is not None:
        # litgpt adds the mask to the softcapped scores, so it must be additive there
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))

    x = gpt.transformer.wte(input_ids)
    if config.scale_embeddings:
        x = x * torch.tensor(config.n_embd**0.5, dtype=x.dtype)
    for block_idx, block in enumerate(gpt.transformer.h):
        if config.rope_indices is not None:
            rope = config.rope_indices[block_idx]
            x = block(x, cos[..., rope], sin[..., rope], mask, None, None)
        else:
            x = block(x, cos, sin, mask, None, None)
    x = gpt.transformer.ln_f(x)
    if lm_head_chunk_size > 0:
        return [_head(gpt, x_i) for x_i in x.split(lm_head_chunk_size, dim=1)]
    return _head(gpt, x)


def _head(gpt, x: torch.Tensor) -> torch.Tensor:
    logits = gpt.lm_head(x)
    if gpt.config.final_logit_softcapping is not None:
        logits = do_softcapping(logits, thresh=gpt.config.final_logit_softcapping)
    return logits


def _through_module_call(model, function, *args):
    """``function(gpt, *args)`` run as if it were the forward of ``model``: ``model(*args)`` with the inner GPT's
    ``forward`` swapped for it for the duration of the call (as Lightning's ``mark_forward_method`` redirects).

    Calling the inner modules directly would skip what wraps the root module's call: Fabric's autocast and dtype
    conversion, and FSDP's gathering of the parameters the root holds (embedding, final norm, head)."""
    gpt = model.module if hasattr(model, "_forward_module") else model  # a Fabric module wraps the GPT
    gpt.forward = lambda *inner: function(gpt, *inner)
    try:
        return model(*args)
    finally:
        del gpt.forward


def batch_logits(model, batch: dict, lm_head_chunk_size: int = 0) -> torch.Tensor | list[torch.Tensor]:
    """The logits of one micro-batch: through ``packed_forward`` when it is packed (has ``segment_ids``), else
    ``model(input_ids)`` as upstream runs it."""
    if "segment_ids" in batch:
        return packed_forward(
            model, batch["input_ids"], batch["position_ids"], batch["segment_ids"], lm_head_chunk_size
        )
    return model(batch["input_ids"], lm_head_chunk_size=lm_head_chunk_size)
