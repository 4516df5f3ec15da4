"""The GPT this run trains: the method's litgpt ``GPT``, whose forward also takes packed rows (``packed_gpt``).

litgpt's ``GPT.forward`` gives every token the rotary position of its place in the row and lets it attend to every
token before it. ``GPT.forward(idx, position_ids=..., segment_lengths=...)`` runs litgpt's own modules in the same
order (embedding, each ``Block``, final norm, head) with, for each token, the rotary cos/sin of its position within its
own sample and, as the attention mask, a ``SegmentMask`` (``packed_attention``): each sample attends only to itself.
Nothing of litgpt's is copied or replaced; the class is the model from the start (no forward is swapped on a live
module), so Fabric's precision context and the strategy's hooks (FSDP's gathering of parameters, activation
checkpointing) apply to a packed call as to ``model(idx)``.

``check_packable(config, block_class)`` refuses, from the config alone (before a weight is read), the models this cannot run
exactly: those with sliding-window layers, whose attention replaces any mask it is given by its own window mask.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import version

import torch
from litgpt.model import do_softcapping

from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.model.packed_attention import TESTED_LITGPT, SegmentMask, block_causal_mask, choose_attention


def check_packable(config, block_class) -> None:
    """Raises ``UserInputError`` when ``--seq.pack true`` cannot train ``config`` exactly as the samples one by one:
    from the config alone, before a weight is read (the attention of the method's ``block_class`` is tried on the meta
    device: no memory, no work)."""
    refuse_sliding_windows(config)
    if choose_attention(config, torch.device("cpu"), None) == "dense":
        return  # the dense path hands litgpt an ordinary mask
    with torch.device("meta"):
        attention = block_class(config, block_idx=0).attn
        tokens = torch.empty(1, 8, config.n_embd)
        cos = torch.empty(1, 8, config.rope_n_elem)
        mask = SegmentMask([[3, 5]], 8, "segments")
        attention(tokens, cos, cos, mask)
    if mask.attention_calls != 1:
        raise attention_not_handed_over(0, 1)


def refuse_sliding_windows(config) -> None:
    windowed = [i for i, on in enumerate((config.sliding_window_indices or [])[: config.n_layer]) if on]
    if config.sliding_window_size is not None and windowed:
        raise UserInputError(
            f"--seq.pack true cannot train {config.name or 'this model'}: it uses sliding-window attention"
            f" (sliding_window_size {config.sliding_window_size}, in layer(s) {', '.join(map(str, windowed[:8]))}"
            f"{' ...' if len(windowed) > 8 else ''}), and litgpt's attention replaces any mask with its window mask in"
            " those layers, so packed samples would attend to each other. Train it with --seq.pack false"
            " (--seq.group_by_length true also cuts padding)."
        )


def attention_not_handed_over(calls: int, layers: int) -> UserInputError:
    return UserInputError(
        f"packed rows: {calls} of {layers} attention layers attended within samples; the installed litgpt"
        f" {version('litgpt')} does not hand its attention mask to scaled_dot_product_attention as --seq.pack needs."
        f" Train with --seq.pack false, or install litgpt {TESTED_LITGPT}."
    )


@cache
def packed_gpt(gpt_class: type) -> type:
    """``gpt_class`` (a litgpt ``GPT``: the base model's, LoRA's, an adapter's) whose forward also takes packed rows."""
    return type(gpt_class.__name__, (PackedForward, gpt_class), {"__module__": __name__})


class PackedForward:
    """Put before a litgpt ``GPT`` class (``packed_gpt``). ``packed_attention`` is the path packed rows take
    (``varlen``, ``segments`` or ``dense``, as ``packed_attention.choose_attention`` picks it for the run's device;
    by default the one for CPU)."""

    def __init__(self, config, packed_attention: str | None = None) -> None:
        super().__init__(config)
        self.packed_attention = packed_attention or choose_attention(config, torch.device("cpu"), "32-true")

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        input_pos_maxp1: int | None = None,
        lm_head_chunk_size: int = 0,
        *,
        position_ids: torch.Tensor | None = None,
        segment_lengths: list[list[int]] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """litgpt's forward; with ``position_ids`` and ``segment_lengths`` (``packing.packed_collate``), the logits of
        packed rows, each sample on its own, shaped as litgpt returns them."""
        if segment_lengths is None:
            return super().forward(idx, input_pos, input_pos_maxp1, lm_head_chunk_size)
        refuse_sliding_windows(self.config)
        T = idx.size(1)
        if T > self.max_seq_length:
            raise ValueError(f"Cannot forward sequence of length {T}, max seq length is only {self.max_seq_length}.")
        cos, sin = self.cos[position_ids], self.sin[position_ids]  # (B, T, rope_n_elem), or (..., 2) with local rope
        mask = self._packed_mask(segment_lengths, T, idx.device)

        x = self.transformer.wte(idx)
        if self.config.scale_embeddings:
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        for block_idx, block in enumerate(self.transformer.h):
            if self.config.rope_indices is not None:
                rope = self.config.rope_indices[block_idx]
                x = block(x, cos[..., rope], sin[..., rope], mask, None, None)
            else:
                x = block(x, cos, sin, mask, None, None)
        if isinstance(mask, SegmentMask) and mask.attention_calls != self.config.n_layer:
            raise attention_not_handed_over(mask.attention_calls, self.config.n_layer)
        x = self.transformer.ln_f(x)
        if lm_head_chunk_size > 0:
            return [self._head(x_i) for x_i in x.split(lm_head_chunk_size, dim=1)]
        return self._head(x)

    def _packed_mask(self, segment_lengths: list[list[int]], width: int, device: torch.device):
        if self.packed_attention != "dense":
            return SegmentMask(segment_lengths, width, self.packed_attention)
        mask = block_causal_mask(segment_lengths, width, device)
        if self.config.attention_logit_softcapping is not None:
            # litgpt adds the mask to the softcapped scores, so it must be additive there
            mask = torch.zeros(mask.shape, device=device).masked_fill_(~mask, float("-inf"))
        return mask

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)
        if self.config.final_logit_softcapping is not None:
            logits = do_softcapping(logits, thresh=self.config.final_logit_softcapping)
        return logits


def batch_logits(model, batch: dict, lm_head_chunk_size: int = 0) -> torch.Tensor | list[torch.Tensor]:
    """The logits of one micro-batch: packed (it has ``segment_lengths``) or as upstream runs ``model(input_ids)``.
    ``model``: this module's ``GPT``, or what ``fabric.setup_module`` made of it."""
    if "segment_lengths" in batch:
        return model(
            batch["input_ids"],
            lm_head_chunk_size=lm_head_chunk_size,
            position_ids=batch["position_ids"],
            segment_lengths=batch["segment_lengths"],
        )
    return model(batch["input_ids"], lm_head_chunk_size=lm_head_chunk_size)
