"""shared_input_forward == the naive per-expert forward of [x; P_k; y] (tiny GPT-2 and Llama).

The oracle runs, for every example and expert alone (no padding), inputs_embeds =
[emb(x_real); P_k; emb(y_real)] through the full model and reads x's, y's and the last logits.
Ragged x and y lengths, all three ``experts`` modes, both layouts, last_only and the prompt
gradient are checked in float64 (TOL[float64]); float32/bfloat16/float16 (eager and sdpa) must
stay within 2x the error of the naive forward in that precision, against the float64 oracle.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from kdengine.experts.shared_input import choose_layout, shared_input_forward
from tests.tolerances import assert_close, assert_within_reference_error

V_GPT2, V_LLAMA, HIDDEN, K, P = 101, 97, 32, 3, 4


def make_model(arch: str, attn: str = "sdpa", dtype=torch.float64):
    if arch == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=HIDDEN, n_head=4, vocab_size=V_GPT2, n_positions=64)
    else:
        config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=V_LLAMA, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.to(dtype).eval().requires_grad_(False)


def make_batch(model, batch=3, x_len=7, y_len=5, seed=1):
    """Random ids with ragged right padding: x lengths x_len, x_len-3, x_len-5, ... (>= 1)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    dtype = model.get_input_embeddings().weight.dtype
    prompts = torch.randn(K, P, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)
    x = torch.randint(0, vocab, (batch, x_len), generator=gen)
    x_lens = [max(1, x_len - 3 * b) for b in range(batch)]
    x_mask = torch.tensor([[1] * n + [0] * (x_len - n) for n in x_lens])
    y = torch.randint(0, vocab, (batch, y_len), generator=gen) if y_len else None
    y_lens = [max(0, y_len - 2 * b) for b in range(batch)]
    y_mask = torch.tensor([[1] * n + [0] * (y_len - n) for n in y_lens]) if y_len else None
    return prompts, x, x_mask, y, y_mask


def naive(model, prompts, x, x_mask, y, y_mask, expert_ids):
    """Per (example, expert): (x logits [n, V], y logits [m, V], last logits [V]) of [x; P_e; y] alone."""
    emb = model.get_input_embeddings()
    out = []
    for b in range(x.shape[0]):
        n = int(x_mask[b].sum())
        m = int(y_mask[b].sum()) if y is not None else 0
        row = []
        for e in expert_ids[b]:
            parts = [emb(x[b, :n]), prompts[e]] + ([emb(y[b, :m])] if m else [])
            logits = model(inputs_embeds=torch.cat(parts)[None]).logits[0]
            row.append((logits[:n], logits[n + P:], logits[-1]))
        out.append(row)
    return out


def expected_ids(experts, batch):
    if experts is None:
        return [list(range(K))] * batch
    return [[int(e) for e in row.reshape(-1)] for row in experts]


def per_example(logits, experts, b, j):
    """Output slice for example b, its j-th expert, whatever the experts mode."""
    if experts is None:
        return logits[j, b]
    return logits[b] if experts.dim() == 1 else logits[b, j]


EXPERT_MODES = {
    "all": lambda b: None,
    "one": lambda b: torch.tensor([2, 0, 1, 2][:b]),
    "topk": lambda b: torch.tensor([[1, 2], [0, 0], [2, 1], [0, 1]][:b]),
}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", list(EXPERT_MODES))
@pytest.mark.parametrize("y_len", [0, 5])
@pytest.mark.parametrize("layout", ["packed", "batched"])
def test_matches_naive_float64(arch, mode, y_len, layout):
    model = make_model(arch)
    prompts, x, x_mask, y, y_mask = make_batch(model, y_len=y_len)
    experts = EXPERT_MODES[mode](x.shape[0])
    ids = expected_ids(experts, x.shape[0])
    ref = naive(model, prompts, x, x_mask, y, y_mask, ids)
    full = shared_input_forward(model, prompts, x, x_mask, experts=experts, response_ids=y,
                                response_attention_mask=y_mask, layout=layout)
    last = shared_input_forward(model, prompts, x, x_mask, experts=experts, response_ids=y,
                                response_attention_mask=y_mask, last_only=True, layout=layout)
    batch, x_len, vocab = x.shape[0], x.shape[1], model.config.vocab_size
    lead = {"all": (K, batch), "one": (batch,), "topk": (batch, 2)}[mode]
    assert full.shape == (*lead, x_len + y_len, vocab)
    assert last.shape == (*lead, vocab)
    for b in range(batch):
        n = int(x_mask[b].sum())
        for j, (x_ref, y_ref, last_ref) in enumerate(ref[b]):
            got = per_example(full, experts, b, j)
            assert_close(got[:n], x_ref, torch.float64, msg=f"x logits b={b} j={j}")
            assert_close(got[x_len:x_len + y_ref.shape[0]], y_ref, torch.float64, msg=f"y logits b={b} j={j}")
            assert_close(per_example(last, experts, b, j), last_ref, torch.float64, msg=f"last b={b} j={j}")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("last_only", [False, True])
def test_prompt_gradient_matches_naive(arch, last_only):
    model = make_model(arch)
    prompts, x, x_mask, y, y_mask = make_batch(model)
    experts = torch.tensor([[2, 0], [1, 1], [0, 2]])
    ids = expected_ids(experts, x.shape[0])
    gen = torch.Generator().manual_seed(7)

    shared_prompts = prompts.clone().requires_grad_(True)
    out = shared_input_forward(model, shared_prompts, x, x_mask, experts=experts, response_ids=y,
                               response_attention_mask=y_mask, last_only=last_only)
    weights = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    if not last_only:
        # Only y's real positions: x's logits do not depend on the prompts, padded ones are unspecified.
        real_y = torch.cat([torch.zeros_like(x_mask), y_mask], dim=1).to(out.dtype)
        weights = weights * real_y[:, None, :, None]
    (out * weights).sum().backward()

    naive_prompts = prompts.clone().requires_grad_(True)
    ref = naive(model, naive_prompts, x, x_mask, y, y_mask, ids)
    x_len = x.shape[1]
    total = 0
    for b in range(x.shape[0]):
        for j, (x_ref, y_ref, last_ref) in enumerate(ref[b]):
            w = weights[b, j]
            if last_only:
                total = total + (last_ref * w).sum()
            else:
                total = total + (y_ref * w[x_len:x_len + y_ref.shape[0]]).sum()
    total.backward()
    assert shared_prompts.grad.abs().sum() > 0
    assert_close(shared_prompts.grad, naive_prompts.grad, torch.float64, msg="prompt gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_low_precision_within_reference_error(dtype, attn):
    """Low precision: error vs the float64 oracle (same weights) <= 2x the naive low-precision one's."""
    model = make_model("llama", attn=attn, dtype=dtype)
    model64 = copy.deepcopy(model).double()
    prompts, x, x_mask, y, y_mask = make_batch(model)
    ids = expected_ids(None, x.shape[0])
    lowp = naive(model, prompts, x, x_mask, y, y_mask, ids)
    truth = naive(model64, prompts.double(), x, x_mask, y, y_mask, ids)
    out = shared_input_forward(model, prompts, x, x_mask, response_ids=y, response_attention_mask=y_mask)
    assert out.dtype == dtype
    got, want64, want_lowp = [], [], []
    for b in range(x.shape[0]):
        n = int(x_mask[b].sum())
        for j in range(K):
            m = lowp[b][j][1].shape[0]
            got += [out[j, b, :n], out[j, b, x.shape[1]:x.shape[1] + m]]
            want64 += list(truth[b][j][:2])
            want_lowp += list(lowp[b][j][:2])
    assert_within_reference_error(torch.cat(got), torch.cat(want64), torch.cat(want_lowp), msg=f"{dtype} {attn}")


def test_one_row_and_unpadded_inputs():
    model = make_model("gpt2")
    prompts, x, _, y, _ = make_batch(model, batch=1, x_len=4, y_len=3)
    ref = naive(model, prompts, x, torch.ones_like(x), y, torch.ones_like(y), [[1]])
    out = shared_input_forward(model, prompts, x, None, experts=torch.tensor([1]), response_ids=y)
    assert_close(out[0, :4], ref[0][0][0], torch.float64)
    assert_close(out[0, 4:], ref[0][0][1], torch.float64)


def test_x_logits_are_shared_not_recomputed():
    model = make_model("gpt2")
    prompts, x, x_mask, _, _ = make_batch(model, y_len=0)
    out = shared_input_forward(model, prompts, x, x_mask)
    assert out.shape[0] == K and out.stride(0) == 0    # one x computation, expanded to K experts


@pytest.mark.parametrize("mode", ["all", "k"])
def test_split_x_passes_x_logits_as_a_stride0_expert_view(mode):
    """split_x: x's logits are one computation viewed by every expert (stride 0, no K copies), the
    pair concatenates to the default output, and the fused loss takes the view as its experts."""
    from kdengine.ops import _backends, fused_experts_kd_loss  # noqa: PLC0415

    model = make_model("gpt2", dtype=torch.float32)
    prompts, x, x_mask, y, y_mask = make_batch(model)
    experts = None if mode == "all" else torch.tensor([[0, 2], [1, 1], [2, 0]])
    kwargs = dict(experts=experts, response_ids=y, response_attention_mask=y_mask)
    x_part, y_part = shared_input_forward(model, prompts, x, x_mask, split_x=True, **kwargs)
    axis = 0 if mode == "all" else 1
    assert x_part.stride(axis) == 0 and x_part.shape[-2] == x.shape[1]
    assert torch.equal(torch.cat([x_part, y_part], dim=-2), shared_input_forward(model, prompts, x, x_mask, **kwargs))
    if mode == "all":
        rows = x_part.reshape(K, -1, V_GPT2)
        assert rows.stride(0) == 0 and rows.data_ptr() == x_part.data_ptr()   # still a view
        student = torch.randn(rows.shape[1:])
        for backend in [b for b in ("torch", "triton") if _backends.availability(b)[0]]:
            loss = fused_experts_kd_loss(student, rows, weighting="entropy", backend=backend)
            torch.testing.assert_close(loss, fused_experts_kd_loss(student, rows.contiguous(), weighting="entropy",
                                                                   backend="torch"))


def test_layouts_agree_and_auto_rule():
    assert choose_layout(k=8, seg_len=4, x_len=64) == "packed"
    assert choose_layout(k=8, seg_len=72, x_len=64) == "batched"
    model = make_model("llama")
    prompts, x, x_mask, y, y_mask = make_batch(model)
    kwargs = dict(response_ids=y, response_attention_mask=y_mask)
    packed = shared_input_forward(model, prompts, x, x_mask, layout="packed", **kwargs)
    batched = shared_input_forward(model, prompts, x, x_mask, layout="batched", **kwargs)
    assert_close(packed, batched, torch.float64)


def test_bad_inputs_raise_clear_errors():
    model = make_model("gpt2")
    prompts, x, x_mask, y, y_mask = make_batch(model)
    cases = [
        (dict(prompts=prompts[0]), "prompts must be a float tensor"),
        (dict(prompts=prompts[:, :, :8]), "hidden size"),
        (dict(input_ids=x.float()), "input_ids must be an integer tensor"),
        (dict(input_ids=x + 1000), r"token ids in \[0, 101\)"),
        (dict(attention_mask=x_mask[:, :3]), "attention_mask must have shape"),
        (dict(attention_mask=x_mask.flip(1)), "right-padded"),
        (dict(attention_mask=x_mask * 2), "0/1"),
        (dict(attention_mask=torch.zeros_like(x_mask)), "at least one real input token"),
        (dict(experts=torch.tensor([0, 1])), r"shape \[B\] or \[B, k\]"),
        (dict(experts=torch.tensor([0, 1, K])), r"expert ids in \[0, 3\)"),
        (dict(experts=torch.tensor([0.0, 1.0, 2.0])), "integer tensor"),
        (dict(response_ids=y[:2]), "B = 3 rows"),
        (dict(response_attention_mask=y_mask), "without response_ids"),
        (dict(layout="tiled"), "layout must be one of"),
    ]
    base = dict(prompts=prompts, input_ids=x, attention_mask=x_mask)
    for override, message in cases:
        args = {**base, **override}
        kwargs = {key: args.pop(key) for key in list(args) if key not in ("prompts", "input_ids", "attention_mask")}
        with pytest.raises(ValueError, match=message):
            shared_input_forward(model, args["prompts"], args["input_ids"], args["attention_mask"], **kwargs)
    with pytest.raises(ValueError, match="attn_implementation"):
        model.config._attn_implementation = "flex_attention"
        shared_input_forward(model, prompts, x, x_mask)


@pytest.mark.skipif(importlib.util.find_spec("kdengine.experts.prompt_experts") is None,
                    reason="kdengine/experts/prompt_experts.py (PromptExperts) does not exist yet")
@pytest.mark.parametrize("last_only", [False, True])
def test_matches_prompt_experts_without_sharing(last_only):
    from kdengine.experts.prompt_experts import PromptExperts  # noqa: PLC0415

    model = make_model("llama")
    prompts, x, x_mask, y, y_mask = make_batch(model)
    experts = torch.tensor([[1, 2], [0, 0], [2, 1]])
    plain = PromptExperts(model, K, P, placement="append", shared_input=False)
    shared = PromptExperts(model, K, P, placement="append")
    assert shared.shared_input
    for module in (plain, shared):
        with torch.no_grad():
            module.prompts.copy_(prompts)
    kwargs = dict(experts=experts, response_ids=y, response_attention_mask=y_mask, last_only=last_only)
    want = plain(x, x_mask, **kwargs).logits
    got = shared(x, x_mask, **kwargs).logits
    assert got.shape == want.shape
    if last_only:
        assert_close(got, want, torch.float64)
        return
    x_len = x.shape[1]
    for b in range(x.shape[0]):
        n, m = int(x_mask[b].sum()), int(y_mask[b].sum())
        assert_close(got[b, :, :n], want[b, :, :n], torch.float64, msg=f"x b={b}")
        assert_close(got[b, :, x_len:x_len + m], want[b, :, x_len:x_len + m], torch.float64, msg=f"y b={b}")
