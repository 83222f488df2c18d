"""The grouped CPU LoRA path gives what vLLM's own CPU punica ops give, skipping base-model tokens."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops.torch_ops import bgmv_expand_slice, bgmv_shrink

from loraflow.serve.punica_cpu import GroupedPunicaWrapperCPU, add_grouped_lora, plan_tokens, slice_weights, slot_ranks


def reference(y, x, lora_a, lora_b, scale, output_slices, indices):
    """vLLM's ops, on the tokens that use an adapter (vLLM computes slot -1 for the others)."""
    used = indices >= 0
    y = y.clone()
    rows = y[used]
    offset = 0
    for a, b, size in zip(lora_a, lora_b, output_slices):
        buffer = torch.zeros(int(used.sum()), a.shape[-2], dtype=torch.float32)
        bgmv_shrink(x[used], a, buffer, indices[used], scale)
        bgmv_expand_slice(buffer, b, rows, indices[used], offset, size, add_inputs=True)
        offset += size
    y[used] = rows
    return y


def test_grouped_path_matches_vllm_ops_for_mixed_adapters_and_base_tokens():
    torch.manual_seed(0)
    slots, rank, hidden, output_slices = 4, 8, 64, (64, 32, 32)
    lora_a = tuple(torch.randn(slots, 1, rank, hidden) for _ in output_slices)
    lora_b = tuple(torch.randn(slots, 1, size, rank) for size in output_slices)
    x = torch.randn(10, hidden)
    y = torch.randn(10, sum(output_slices))
    indices = torch.tensor([0, 2, -1, 2, 0, 3, -1, 0, 2, 3])
    expected = reference(y, x, lora_a, lora_b, 0.5, output_slices, indices)
    add_grouped_lora(y, x, lora_a, lora_b, 0.5, output_slices, plan_tokens(indices))
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(y[2], expected[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_slots_in_use_for_an_fp32_and_a_bf16_model(dtype):
    """Every loaded adapter in use (consecutive slots: the weights are read as a view); y keeps its dtype."""
    torch.manual_seed(2)
    slots, rank, hidden, output_slices = 3, 8, 64, (64, 32)
    lora_a = tuple(torch.randn(slots, 1, rank, hidden) for _ in output_slices)
    lora_b = tuple(torch.randn(slots, 1, size, rank) for size in output_slices)
    x, y = torch.randn(9, hidden), torch.randn(9, sum(output_slices))
    indices = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])
    expected = reference(y, x, lora_a, lora_b, 0.25, output_slices, indices)
    low = [tuple(t.to(dtype) for t in stacked) for stacked in (lora_a, lora_b)]
    y_low = y.to(dtype)
    add_grouped_lora(y_low, x.to(dtype), *low, 0.25, output_slices, plan_tokens(indices))
    assert y_low.dtype == dtype
    tolerance = 1e-3 if dtype == torch.float32 else 0.15  # bf16 keeps 8 bits of mantissa
    torch.testing.assert_close(y_low.float(), expected, rtol=tolerance, atol=tolerance * 10)


def test_one_adapter_for_every_token_needs_no_gather():
    torch.manual_seed(1)
    lora_a, lora_b = (torch.randn(2, 1, 4, 16),), (torch.randn(2, 1, 16, 4),)
    x, y = torch.randn(3, 16), torch.randn(3, 16)
    indices = torch.tensor([1, 1, 1])
    plan = plan_tokens(indices)
    assert plan.single and plan.slots == [1]
    expected = reference(y, x, lora_a, lora_b, 1.0, (16,), indices)
    add_grouped_lora(y, x, lora_a, lora_b, 1.0, (16,), plan)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-3)


def test_plan_groups_tokens_by_slot_and_drops_base_tokens():
    assert plan_tokens(torch.tensor([-1, -1])).slots == []
    plan = plan_tokens(torch.tensor([1, -1, 0, 1]))
    assert plan.slots == [0, 1] and plan.longest == 2
    assert plan.dest.tolist() == [2, 0, 3]


def test_cached_weights_follow_an_adapter_loaded_into_a_slot():
    """The wrapper keeps each module's fp32 weights between steps; loading another adapter into a slot (vLLM writes
    the stacked tensors in place) must reach the next step's answer."""
    torch.manual_seed(3)
    wrapper = GroupedPunicaWrapperCPU.__new__(GroupedPunicaWrapperCPU)  # only its weight cache is exercised
    wrapper._weights = {}
    slots, rank, hidden, output_slices = 2, 4, 32, (32, 16)
    lora_a = tuple(torch.randn(slots, 1, rank, hidden) for _ in output_slices)
    lora_b = tuple(torch.randn(slots, 1, size, rank) for size in output_slices)
    x, indices = torch.randn(5, hidden), torch.tensor([0, 1, 1, 0, 1])

    def step():
        y = torch.zeros(5, sum(output_slices))
        add_grouped_lora(
            y, x, lora_a, lora_b, 1.0, output_slices, plan_tokens(indices), weights_for=wrapper._weights_for
        )
        return y

    first = step()
    torch.testing.assert_close(step(), first)
    lora_b[1][1].copy_(torch.randn(1, 16, rank))  # slot 1 gets another adapter's second slice
    second = step()
    expected = reference(torch.zeros(5, sum(output_slices)), x, lora_a, lora_b, 1.0, output_slices, indices)
    torch.testing.assert_close(second, expected, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(second[:, 32:], first[:, 32:])


def load(stacked_a, stacked_b, slot, rank, targets, generator):
    """What vLLM does when it loads an adapter of `rank` into `slot`: A into the first `rank` rows, B into the
    first `rank` columns, zeros elsewhere; slices the adapter does not target stay zero."""
    for a, b, targeted in zip(stacked_a, stacked_b, targets):
        a[slot].zero_()
        b[slot].zero_()
        if targeted:
            a[slot, 0, :rank] = torch.randn(rank, a.shape[-1], generator=generator)
            b[slot, 0, :, :rank] = torch.randn(b.shape[-2], rank, generator=generator)


def test_adapters_of_several_ranks_and_targets_are_computed_at_their_own_rank():
    """Slots of rank 4 and 16 on a server sized for rank 32, and one adapter that leaves the second slice alone:
    the grouped path cuts the products to the largest rank in use and leaves out slots that do not target a
    module, and the answer is vLLM's."""
    generator = torch.Generator().manual_seed(4)
    slots, max_rank, hidden, output_slices = 4, 32, 48, (48, 16)
    lora_a = tuple(torch.zeros(slots, 1, max_rank, hidden) for _ in output_slices)
    lora_b = tuple(torch.zeros(slots, 1, size, max_rank) for size in output_slices)
    load(lora_a, lora_b, 0, 4, (True, True), generator)
    load(lora_a, lora_b, 1, 16, (True, False), generator)
    load(lora_a, lora_b, 3, 4, (False, True), generator)
    assert [slot_ranks(a, b) for a, b in zip(lora_a, lora_b)] == [[4, 16, 0, 0], [4, 0, 0, 4]]

    seen = []

    def weights_for(a, b, ranks, in_use):
        seen.append((ranks, in_use))
        return slice_weights(a, b, ranks, in_use)

    x, y = torch.randn(7, hidden), torch.randn(7, sum(output_slices))
    indices = torch.tensor([1, 0, -1, 3, 1, 0, 1])
    expected = reference(y, x, lora_a, lora_b, 0.5, output_slices, indices)
    add_grouped_lora(y, x, lora_a, lora_b, 0.5, output_slices, plan_tokens(indices), weights_for=weights_for)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-3)
    assert seen == [([16, 4], [0, 1, 3])]

    only_first = (lora_a[0],), (lora_b[0],)  # a module that slot 3's adapter does not target
    seen.clear()
    y, indices = torch.randn(7, 48), torch.tensor([3, 0, 3, 3, 1, 0, 3])
    expected = reference(y, x, *only_first, 0.5, (48,), indices)
    add_grouped_lora(y, x, *only_first, 0.5, (48,), plan_tokens(indices), weights_for=weights_for)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-3)
    assert seen == [([16], [0, 1])]


def test_the_wrapper_finds_the_rank_again_only_for_a_slot_that_got_another_adapter():
    generator = torch.Generator().manual_seed(5)
    wrapper = GroupedPunicaWrapperCPU.__new__(GroupedPunicaWrapperCPU)  # only its rank cache is exercised
    wrapper._ranks, wrapper._slot_ids = {}, [11, 12, None]
    lora_a, lora_b = (torch.zeros(3, 1, 16, 24),), (torch.zeros(3, 1, 24, 16),)
    load(lora_a, lora_b, 0, 4, (True,), generator)
    load(lora_a, lora_b, 1, 8, (True,), generator)
    assert wrapper._slot_ranks(lora_a[0], lora_b[0]) == [4, 8, 0]
    load(lora_a, lora_b, 2, 16, (True,), generator)
    wrapper._slot_ids = [11, 12, 13]  # vLLM activated adapter 13 in slot 2
    assert wrapper._slot_ranks(lora_a[0], lora_b[0]) == [4, 8, 16]
    load(lora_a, lora_b, 0, 2, (True,), generator)
    wrapper._slot_ids = [14, 12, 13]
    assert wrapper._slot_ranks(lora_a[0], lora_b[0]) == [2, 8, 16]
