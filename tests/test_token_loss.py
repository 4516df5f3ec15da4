"""--seq.loss_weighting token: the gradient of a step with accumulation (and ranks) is that of the mean loss over
all its supervised tokens, for random, length-grouped and packed micro-batches."""

import random

import pytest
import torch
from litgpt.data.base import get_sft_collate_fn
from litgpt.utils import CycleIterator, chunked_cross_entropy
from test_packing import lora_gradients, sample, tiny_lora_gpt

from data_utils import grouped_batches
from litgpt_seqlen.data.packing import pack_rows, packed_collate
from litgpt_seqlen.training.loss import StepLookahead, micro_batch_loss_sum, step_supervised_tokens, train_loss


def items_of_uneven_targets():
    rng = random.Random(1)
    # (length, prompt): targets per sample from 1 to 19, so micro-batches carry very different token counts
    shapes = [(20, 18), (9, 0), (14, 12), (25, 5), (6, 4), (18, 0), (11, 9), (16, 2)]
    return [sample(rng, n, p) for n, p in shapes]


def micro_batches(items, how: str) -> tuple[list[dict], list[list[int]]]:
    """The micro-batches of ``items`` and, for each, the indices of the items it holds."""
    lengths = [len(item["input_ids"]) for item in items]
    if how == "packed":
        rows = pack_rows(lengths, max_seq_length=26, seed=0, epoch=0)  # every sample once, nothing filled
        plan = [rows[i : i + 2] for i in range(0, len(rows), 2)]
        batches = [packed_collate([[items[i] for i in row] for row in rows]) for rows in plan]
        return batches, [[i for row in rows for i in row] for rows in plan]
    plan = grouped_batches(lengths, 2, seed=0, epoch=0) if how == "grouped" else [[5, 0], [3, 6], [2, 7], [1, 4]]
    return [get_sft_collate_fn()([items[i] for i in batch]) for batch in plan], plan


def mean_over_all_tokens(model, items):
    """The reference: each sample alone through litgpt's GPT.forward; sum of token losses / count of targets.
    Returns that loss and its LoRA gradients."""
    model.zero_grad()
    total = count = 0
    for item in items:
        logits = model(item["input_ids"][None])[0]
        total = total + torch.nn.functional.cross_entropy(
            logits[:-1], item["labels"][1:], reduction="sum", ignore_index=-100
        )
        count += int((item["labels"][1:] != -100).sum())
    (total / count).backward()
    return (total / count).item(), lora_gradients(model)


class OtherRanks:
    """Stands for Fabric in StepLookahead: ``world_size`` ranks, whose all_reduce(sum) adds the others' counts."""

    def __init__(self, world_size: int, others_count: int) -> None:
        self.world_size, self.others_count, self.device = world_size, others_count, torch.device("cpu")

    def all_reduce(self, tensor, reduce_op):
        assert reduce_op == "sum"
        return tensor + self.others_count


def token_weighted_step(model, batches, fabric=None):
    """One optimizer step as fit runs it under token weighting: StepLookahead over the micro-batches, train_loss with
    the step's tokens per micro-batch, backward(loss / accumulation). Returns the gradients and the losses."""
    model.zero_grad()
    ahead = StepLookahead(CycleIterator(batches), accumulation=len(batches), fabric=fabric)
    losses = []
    for _ in batches:
        loss = train_loss(model, next(ahead), ahead.tokens_per_micro_batch)
        (loss / len(batches)).backward()
        losses.append(loss.item())
    return lora_gradients(model), losses


def assert_same(gradients, reference):
    for key in reference:
        torch.testing.assert_close(gradients[key], reference[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["random", "grouped", "packed"])
def test_step_gradient_is_the_mean_over_all_its_tokens(how):
    model = tiny_lora_gpt("llama")
    items = items_of_uneven_targets()
    reference_loss, reference = mean_over_all_tokens(model, items)
    batches, groups = micro_batches(items, how)
    assert len(batches) >= 3 and sorted(i for group in groups for i in group) == list(range(len(items)))

    gradients, losses = token_weighted_step(model, batches)
    assert_same(gradients, reference)
    assert sum(losses) / len(losses) == pytest.approx(reference_loss, abs=1e-5)  # the loss fit logs for the step

    # two ranks, each with its own micro-batches; the ranks' gradients are averaged as data parallelism does
    n = len(batches) // 2
    shares = [batches[:n], batches[n : 2 * n]]
    counts = [int(step_supervised_tokens(share)) for share in shares]
    ranks = [token_weighted_step(model, shares[r], OtherRanks(2, counts[1 - r]))[0] for r in range(2)]
    _, reference = mean_over_all_tokens(model, [items[i] for group in groups[: 2 * n] for i in group])
    assert_same({key: (ranks[0][key] + ranks[1][key]) / 2 for key in reference}, reference)


def test_upstreams_per_micro_batch_mean_weighs_tokens_unevenly():
    """The test above can fail: the mean of the micro-batches' means is not the mean over the step's tokens."""
    model = tiny_lora_gpt("llama")
    items = items_of_uneven_targets()
    _, reference = mean_over_all_tokens(model, items)
    batches, _ = micro_batches(items, "random")
    model.zero_grad()
    for batch in batches:
        logits = model(batch["input_ids"])
        (chunked_cross_entropy(logits[..., :-1, :], batch["labels"][..., 1:]) / len(batches)).backward()
    upstream = lora_gradients(model)
    assert not all(torch.allclose(upstream[key], reference[key], atol=1e-4) for key in reference)


@pytest.mark.parametrize("chunk", [0, 5])
def test_loss_sum_over_count_is_litgpts_mean(chunk):
    torch.manual_seed(0)
    logits = torch.randn(3, 11, 17)
    labels = torch.randint(0, 17, (3, 11))
    labels[0, :6] = -100
    labels[2, 9:] = -100
    total, count = micro_batch_loss_sum(list(logits.split(chunk, dim=1)) if chunk else logits, labels)
    chunks = list(logits.split(chunk, dim=1)) if chunk else logits
    if chunk:
        chunks[-1] = chunks[-1][..., :-1, :]
    else:
        chunks = chunks[..., :-1, :]
    expected = chunked_cross_entropy(chunks, labels[..., 1:])
    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total / count, expected)


def test_a_step_without_targets_gives_zero_not_nan():
    labels = torch.full((2, 5), -100)
    assert step_supervised_tokens([{"labels": labels}]) == 1
    total, count = micro_batch_loss_sum(torch.randn(2, 5, 7), labels)
    assert count == 0 and total == 0


def test_step_lookahead_gives_the_same_batches_with_their_steps_tokens():
    labels = [torch.tensor([[-100, 1, 2, -100]]), torch.tensor([[-100, 1, -100, -100]]), torch.tensor([[5, 6, 7, 8]])]
    loader = [{"labels": t} for t in labels]  # an epoch of 3 micro-batches, 2 to a step
    plain, ahead = CycleIterator(loader), StepLookahead(CycleIterator(loader), accumulation=2)
    for expected_tokens in (2 + 1, 2 + 1, 3 + 2, 3 + 2, 1 + 3, 1 + 3):
        assert next(ahead) is next(plain)
        assert ahead.epoch == plain.epoch and ahead.tokens_per_micro_batch == expected_tokens / 2
    assert ahead.iterable is loader  # other attributes are the wrapped iterator's


@pytest.mark.parametrize("how", ["random", "packed"])
def test_train_loss_without_step_tokens_is_the_micro_batchs_mean(how):
    model = tiny_lora_gpt("llama")
    items = items_of_uneven_targets()
    batches, groups = micro_batches(items, how)
    expected, _ = mean_over_all_tokens(model, [items[i] for i in groups[0]])
    assert train_loss(model, batches[0]).item() == pytest.approx(expected, abs=1e-5)
