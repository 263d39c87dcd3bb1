"""expert_batch_embed: every backend against the float64 reference (forward, prompt and weight grads).

Fresh random inputs; ragged right-padded masks (one row with no real token); all three ``experts``
modes × both placements × fp32/bf16/fp16; grad_output random (not ones); odd sizes (prime vocab,
H not a multiple of the kernel block, vocab > 65536, one row); non-contiguous inputs. Backends
that cannot run here are skipped with their availability reason.
"""

from __future__ import annotations

import pytest
import torch

from kdengine.ops import _backends
from kdengine.ops.expert_batch_embed import expert_batch_embed
from kdengine.reference.expert_batch_embed import expert_batch_embed_reference
from tests.tolerances import assert_close

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EXPERT_MODES = ("all", "one", "several")
PLACEMENTS = ("prepend", "append")


def backend_or_skip(name: str) -> str:
    ok, why = _backends.availability(name)
    if not ok:
        pytest.skip(f"{name}: {why}")
    return name


@pytest.fixture(params=["torch", "triton", "cuda"])
def backend(request):
    return backend_or_skip(request.param)


def device_for(backend: str) -> str:
    return (
        "cuda" if backend == "cuda" or (backend == "triton" and not _backends.triton_interpreter()) else "cpu"
    )


def make_case(
    mode,
    *,
    batch=3,
    length=7,
    vocab=53,
    hidden=40,
    experts=4,
    plen=5,
    dtype=torch.float32,
    device="cpu",
    seed=0,
):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[-1] = 0 if batch > 1 else lengths[-1]  # one example without real tokens
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    weight = torch.randn(vocab, hidden, generator=gen).to(dtype)
    prompts = torch.randn(experts, plen, hidden, generator=gen)  # fp32 prompts, cast to the weight's dtype
    routes = {
        "all": None,
        "one": torch.randint(0, experts, (batch,), generator=gen),
        "several": torch.randint(0, experts, (batch, 2), generator=gen),
    }[mode]
    return tuple(None if t is None else t.to(device) for t in (ids, weight, prompts, mask, routes))


def run_against_reference(backend, ids, weight, prompts, mask, routes, placement, *, weight_grad=True):
    weight = weight.detach().requires_grad_(weight_grad)
    prompts = prompts.detach().requires_grad_(True)
    embeds, out_mask = expert_batch_embed(
        ids, weight, prompts, attention_mask=mask, experts=routes, placement=placement, backend=backend
    )
    w64 = weight.detach().double().requires_grad_(weight_grad)
    p64 = prompts.detach().double().requires_grad_(True)
    want, want_mask = expert_batch_embed_reference(ids, w64, p64, mask, routes, placement)
    dtype = weight.dtype
    assert embeds.dtype == dtype and embeds.shape == want.shape
    # A gather is exact: the output equals the reference in the weight's dtype bit for bit.
    exact, _ = expert_batch_embed_reference(ids, weight.detach(), prompts.detach(), mask, routes, placement)
    assert torch.equal(embeds.detach().cpu(), exact.cpu())
    assert_close(embeds.detach().cpu(), want.detach().cpu(), dtype, msg="embeds")
    assert torch.equal(out_mask.cpu(), want_mask.cpu()) and out_mask.dtype == want_mask.dtype
    # The upstream gradient arrives in the output's dtype: the oracle gets the same rounded values.
    grad_out = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(7)).to(embeds.device, dtype)
    embeds.backward(grad_out)
    want.backward(grad_out.double())
    assert prompts.grad.dtype == prompts.dtype
    assert_close(prompts.grad.cpu(), p64.grad.cpu(), dtype, msg="grad prompts")
    if weight_grad:
        assert weight.grad.dtype == dtype
        assert_close(weight.grad.cpu(), w64.grad.cpu(), dtype, msg="grad weight")
    return embeds, prompts.grad, weight.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("mode", EXPERT_MODES)
def test_matches_reference(backend, mode, placement, dtype):
    case = make_case(
        mode,
        dtype=dtype,
        device=device_for(backend),
        seed=10 * EXPERT_MODES.index(mode) + PLACEMENTS.index(placement),
    )
    run_against_reference(backend, *case, placement)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_odd_shapes(backend, placement):
    device = device_for(backend)
    # Vocabulary > 65536 (ids beyond 16 bits), one example, one expert, one prompt vector, odd H.
    ids, weight, prompts, mask, _ = make_case(
        "one", batch=1, length=5, vocab=70001, hidden=7, experts=1, plen=1, device=device, seed=3
    )
    ids[0, 0] = 70000
    run_against_reference(
        backend, ids, weight, prompts, mask, torch.zeros(1, dtype=torch.long, device=device), placement
    )
    # Prime vocabulary, H not a multiple of the kernel's block, P longer than the text.
    case = make_case(
        "several", batch=2, length=3, vocab=101, hidden=67, experts=3, plen=9, device=device, seed=4
    )
    run_against_reference(backend, *case, placement)


def test_non_contiguous_inputs(backend):
    device = device_for(backend)
    ids, weight, prompts, mask, routes = make_case("several", device=device, seed=5)
    ids_nc = torch.stack([ids, ids.flip(1)], dim=2)[..., 0]  # stride (2L, 2)
    weight_nc = weight.t().contiguous().t()  # column-major [V, H]
    prompts_nc = torch.cat([prompts, prompts], dim=2)[..., : prompts.shape[2]]  # sliced last dim
    routes_nc = routes.t().contiguous().t()
    assert not (ids_nc.is_contiguous() or weight_nc.is_contiguous() or prompts_nc.is_contiguous())
    for placement in PLACEMENTS:
        run_against_reference(backend, ids_nc, weight_nc, prompts_nc, mask.bool(), routes_nc, placement)


def test_no_weight_grad_and_no_mask(backend):
    ids, weight, prompts, _, _ = make_case("all", device=device_for(backend), seed=6)
    embeds, _, weight_grad = run_against_reference(
        backend, ids, weight, prompts, None, None, "append", weight_grad=False
    )
    assert weight_grad is None
    assert embeds.shape == (4 * 3, 5 + 7, 40)


def test_backward_is_deterministic(backend):
    case = make_case("several", batch=4, experts=2, device=device_for(backend), seed=8)
    first = run_against_reference(backend, *case, "append")
    second = run_against_reference(backend, *case, "append")
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


def test_layout_by_hand():
    """The documented row layout on a tiny example (independent of the reference)."""
    weight = torch.arange(10.0).unsqueeze(1).repeat(1, 2)  # embedding of id v = [v, v]
    prompts = -torch.arange(1.0, 7.0).view(3, 2, 1).repeat(1, 1, 2)  # expert k slot j = -(2k + j + 1)
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    embeds, out_mask = expert_batch_embed(
        ids,
        weight,
        prompts,
        attention_mask=mask,
        placement="append",
        experts=torch.tensor([[2, 0], [1, 1]]),
        backend="torch",
    )
    assert embeds[:, :, 0].tolist() == [
        [1, 2, 3, -5, -6],
        [1, 2, 3, -1, -2],
        [4, 5, -3, -4, 0],
        [4, 5, -3, -4, 0],
    ]
    assert out_mask.tolist() == [[1] * 5, [1] * 5, [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    embeds, out_mask = expert_batch_embed(ids, weight, prompts[:2], attention_mask=mask, backend="torch")
    assert embeds[:, :, 0].tolist() == [
        [-1, -2, 1, 2, 3],
        [-1, -2, 4, 5, 0],
        [-3, -4, 1, 2, 3],
        [-3, -4, 4, 5, 0],
    ]
    assert out_mask[1].tolist() == [1, 1, 1, 1, 0]


def test_auto_and_explicit_selection():
    ids, weight, prompts, mask, _ = make_case("all", seed=9)
    embeds, _ = expert_batch_embed(ids, weight, prompts, attention_mask=mask)  # auto: torch on CPU
    assert embeds.shape == (12, 12, 40)
    if not _backends.availability("cuda")[0]:
        with pytest.raises(_backends.BackendUnavailable, match="cuda"):
            expert_batch_embed(ids, weight, prompts, attention_mask=mask, backend="cuda")
    if _backends.availability("triton")[0]:
        with pytest.raises(_backends.BackendUnavailable, match="float64"):
            expert_batch_embed(ids, weight.double(), prompts, attention_mask=mask, backend="triton")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(input_ids=torch.randn(2, 3)), "input_ids must be a 2-D integer"),
        (dict(input_ids=torch.zeros(6, dtype=torch.long)), "input_ids must be a 2-D integer"),
        (dict(prompts=torch.randn(4, 8)), r"prompts must be a 3-D float tensor \[K, P, H\]"),
        (
            dict(prompts=torch.randn(2, 3, 9)),
            "hidden size mismatch: prompts have H=9 but embedding_weight has H=8",
        ),
        (dict(embedding_weight=torch.randn(20, 6)), "prompts have H=8 but embedding_weight has H=6"),
        (dict(experts=torch.tensor([0.0, 1.0])), "experts must be an integer tensor"),
        (dict(experts=torch.tensor([0, 1, 1])), r"experts must have shape \[B\]=\[2\]"),
        (dict(experts=torch.zeros(2, 2, 2, dtype=torch.long)), r"experts must have shape"),
        (dict(experts=torch.tensor([0, 2])), r"experts must lie in \[0, 2\)"),
        (dict(placement="middle"), "unknown placement 'middle'"),
        (
            dict(attention_mask=torch.ones(2, 4, dtype=torch.long)),
            "attention_mask must have the shape of input_ids",
        ),
        (dict(attention_mask=torch.tensor([[0, 1, 1], [1, 1, 0]]), placement="append"), "right-padded"),
        (dict(input_ids=torch.tensor([[1, 2, 20], [0, 0, 0]])), r"input_ids must lie in \[0, 20\)"),
    ],
)
def test_bad_inputs(change, message):
    args = dict(
        input_ids=torch.tensor([[1, 2, 3], [4, 5, 0]]),
        embedding_weight=torch.randn(20, 8),
        prompts=torch.randn(2, 3, 8),
        attention_mask=None,
        experts=None,
        placement="prepend",
    )
    args.update(change)
    with pytest.raises(ValueError, match=message):
        expert_batch_embed(args.pop("input_ids"), args.pop("embedding_weight"), args.pop("prompts"), **args)
