"""Attention over packed rows, at the cost of its samples: each sample attends causally to itself only.

litgpt's attention modules compute q, k and v (projection, norms, rotary, GQA layout) and then call
``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, ...)`` with the ``mask`` the model was given. A packed
forward gives them a ``SegmentMask``: not a tensor but an object torch hands that call to (``__torch_function__``),
which then attends within each sample. The modules stay litgpt's; only the one product of q, k and v is computed
here, by one of three paths:

* ``varlen``: FlashAttention over the samples of all rows at once (``torch.nn.attention.varlen.varlen_attn`` with the
  samples' cumulative offsets); CUDA in float16 / bfloat16, when a trial call on this device gives the segments'
  result.
* ``segments``: ``F.scaled_dot_product_attention`` causal, with no mask, on each sample's slice of the row (any
  device). Its cost is the sum of the squares of the samples' lengths.
* ``dense``: one ``(rows, 1, T, T)`` mask, causal within a sample and closed between samples, given to litgpt as
  an ordinary mask. It costs T² per row; it is the reference, and the path for models whose attention softcaps its
  logits (litgpt adds the mask to the softcapped scores itself, so no fused kernel can stand in).
"""

from __future__ import annotations

from importlib.metadata import version

import torch
import torch.nn.functional as F

from litgpt_seqlen.errors import UserInputError

TESTED_LITGPT = "0.5.13"  # the litgpt whose attention the packed paths are tested against (requirements.txt)

DESCRIPTIONS = {
    "varlen": "FlashAttention varlen over the samples of each micro-batch",
    "segments": "causal attention on each sample's slice of a row",
    "dense": "a block-causal mask over each whole row (T² per row)",
}


def choose_attention(config, device: torch.device, precision: str | None) -> str:
    """The path a packed forward takes for ``config`` on ``device`` under ``--precision`` (its activations'
    dtype: bfloat16 for bf16-*, float16 for 16-*, else float32)."""
    if config.attention_logit_softcapping is not None:
        return "dense"
    if device.type == "cuda":
        precision = str(precision)
        dtype = (
            torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
        )
        if dtype is not None and varlen_works(device, dtype):  # FlashAttention has no float32 kernel
            return "varlen"
    return "segments"


def choose_for_run(fabric, config, precision: str | None) -> str:
    """``choose_attention`` for the run's device, said on the console."""
    path = choose_attention(config, fabric.device, precision)
    why = " (the model softcaps its attention logits)" if path == "dense" else ""
    fabric.print(f"Packed attention: {path}, {DESCRIPTIONS[path]}{why}")
    return path


def varlen_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``varlen_attn`` runs on ``device`` in ``dtype`` and gives what the segments path gives, forward and
    backward, on a small trial (two rows, four samples, GQA-expanded heads as litgpt passes them)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.10)
    except ImportError:
        return False
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 64, generator=generator, device=device, dtype=dtype) for _ in range(3))
    lengths = [[5, 12], [24]]  # and 7 tokens of padding in the first row
    try:
        fast = _trial(SegmentMask(lengths, 24, "varlen"), q, k, v)
        reference = _trial(SegmentMask(lengths, 24, "segments"), q, k, v)
    except Exception:  # whatever stops the trial (no kernel for this GPU or dtype) rules the path out; segments stay
        return False
    return all(torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2) for a, b in zip(fast, reference))


def _trial(mask: SegmentMask, q, k, v) -> list[torch.Tensor]:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125)
    y.square().sum().backward()
    return [y, q.grad, k.grad, v.grad]


class SegmentMask:
    """The mask of packed rows of ``width`` tokens, for litgpt's attention: ``lengths[r]`` are the lengths of the
    samples in row ``r``, in order (``packing.packed_collate``'s ``segment_lengths``). The rest of a row is padding,
    a segment of its own: its tokens attend among themselves (their outputs are never used, but stay finite).

    ``attention_calls`` counts the attention products it computed, so a forward can tell that every layer used it.
    """

    def __init__(self, lengths: list[list[int]], width: int, path: str) -> None:
        if path not in ("varlen", "segments"):
            raise ValueError(f"SegmentMask computes the varlen and segments paths, not {path!r}")
        self.lengths, self.path, self.attention_calls = with_padding(lengths, width), path, 0
        self._offsets: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            kwargs.update(zip(names, args))
            mask = kwargs.pop("attn_mask", None)
            if isinstance(mask, cls):
                return mask.attend(**kwargs)
        # Anything else (adding it to scores, slicing it) means litgpt's attention changed: fail loudly, not wrongly.
        raise UserInputError(
            f"the packed-row mask reached {getattr(func, '__name__', func)}, not scaled_dot_product_attention: the"
            f" installed litgpt {version('litgpt')} uses its attention mask in a way --seq.pack does not support."
            f" Train with --seq.pack false, or install litgpt {TESTED_LITGPT}."
        )

    def attend(self, query, key, value, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        """``F.scaled_dot_product_attention(query, key, value)`` within each sample; shapes ``(rows, heads, T, d)``."""
        rows, _, width, _ = query.shape
        if rows != len(self.lengths) or any(sum(row) != width for row in self.lengths):
            raise ValueError(f"the packed-row mask is for rows of {self.lengths}, got q of shape {tuple(query.shape)}")
        self.attention_calls += 1
        dtypes = {query.dtype, key.dtype, value.dtype}
        if self.path == "varlen" and dtypes in ({torch.float16}, {torch.bfloat16}) and not dropout_p:
            return self._varlen(query, key, value, scale, enable_gqa)
        # the segments path (also what varlen leaves: FlashAttention takes one half-precision dtype, no dropout)
        options = {"dropout_p": dropout_p, "scale": scale, "enable_gqa": enable_gqa, "is_causal": True}
        outputs = []
        # unbind and split, not slicing: each has one backward that joins the pieces' gradients, where a slice's
        # backward writes its piece into a zero tensor of the whole row
        for row, *qkv in zip(self.lengths, *(t.unbind(0) for t in (query, key, value))):
            samples = zip(*(t.split(row, dim=1) for t in qkv))
            pieces = [F.scaled_dot_product_attention(q[None], k[None], v[None], **options) for q, k, v in samples]
            outputs.append(torch.cat(pieces, dim=2))
        return torch.cat(outputs, dim=0)

    def _varlen(self, query, key, value, scale, enable_gqa):
        from torch.nn.attention.varlen import varlen_attn

        rows, heads, width, _ = query.shape
        # (rows, heads, T, d) -> (rows * T, heads, d): the rows one after another, each sample a run of tokens
        q, k, v = (t.transpose(1, 2).reshape(rows * width, t.size(1), t.size(3)) for t in (query, key, value))
        offsets, longest = self.offsets(query.device), max(max(row) for row in self.lengths)
        y = varlen_attn(
            q, k, v, offsets, offsets, longest, longest, scale=scale, window_size=(-1, 0), enable_gqa=enable_gqa
        )
        return y.view(rows, width, heads, -1).transpose(1, 2)

    def offsets(self, device: torch.device) -> torch.Tensor:
        """``cu_seqlens``: where each sample starts in the rows laid end to end, and the total, as int32."""
        if device not in self._offsets:
            ends, total = [0], 0
            for length in (length for row in self.lengths for length in row):
                total += length
                ends.append(total)
            self._offsets[device] = torch.tensor(ends, dtype=torch.int32).to(device, non_blocking=True)
        return self._offsets[device]


def with_padding(lengths: list[list[int]], width: int) -> list[list[int]]:
    """Each row's segment lengths, its padding (if any) last: every row's add up to ``width``."""
    rows = [list(row) + ([width - sum(row)] if sum(row) < width else []) for row in lengths]
    if any(sum(row) != width or min(row) < 1 for row in rows):
        raise ValueError(f"segment lengths {lengths} do not fit rows of {width} tokens")
    return rows


def block_causal_mask(lengths: list[list[int]], width: int, device: torch.device | None = None) -> torch.Tensor:
    """The dense reference: ``(rows, 1, T, T)`` booleans, token i may attend to token j when j <= i and both are in
    the same segment (``lengths`` and ``width`` as in ``SegmentMask``)."""
    segment_ids = torch.tensor(
        [[s for s, length in enumerate(row) for _ in range(length)] for row in with_padding(lengths, width)],
        device=device,
    )
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    return ((segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)) & causal).unsqueeze(1)
