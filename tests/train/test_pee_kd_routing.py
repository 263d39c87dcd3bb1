"""PEE-KD's expert_routing: which examples each expert trains on (all, one_per_batch, hash, learned),
the learned router's load-balancing term, the loss over the experts present in a batch, and the
agreement / oracle-gap report."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kdengine.config import method_options
from kdengine.experts import PromptExperts
from kdengine.methods.pee_kd import (
    EXPERTS,
    ROUTER,
    PEEKD,
    PEEKDOptions,
    expert_agreement,
    expert_assignment,
    router_loss,
    uncertainty_weights,
)
from kdengine.methods.selector import ExpertSelector
from kdengine.models import AUTO_CLASSES
from kdengine.options import ConfigError
from kdengine.tiny_models import build_tiny_models
from kdengine.train import checkpoint
from kdengine.train.__main__ import main
from tests.train import metrics_rows, small_args

K = 4


def test_hash_is_a_fixed_even_partition_of_the_examples():
    ids = torch.arange(4000)
    assign = expert_assignment("hash", K, ids, step=0)
    assert assign.dtype == torch.long and set(assign.tolist()) == set(range(K))
    assert torch.bincount(assign, minlength=K).min() > 0.9 * 4000 / K            # even for any order
    shuffled = torch.randperm(4000)                                           # another batch order, step
    torch.testing.assert_close(expert_assignment("hash", K, ids[shuffled], step=7), assign[shuffled])
    assert not torch.equal(assign[:K], torch.arange(K))                        # not id mod K
    three = expert_assignment("hash", 3, ids, step=0)
    assert set(three.tolist()) == {0, 1, 2}


def test_one_per_batch_sends_a_whole_batch_to_one_expert_cycling_with_the_step():
    ids = torch.tensor([5, 17, 3, 99])
    for step in range(9):
        assert expert_assignment("one_per_batch", K, ids, step).tolist() == [step % K] * 4
    with pytest.raises(ValueError, match="routing 'learned' is not one of"):
        expert_assignment("learned", K, ids, 0)


def test_an_unknown_routing_mode_or_a_negative_balance_weight_is_refused_before_work():
    with pytest.raises(ConfigError, match="expert_routing"):
        method_options(PEEKD, {"expert_routing": "random"})
    with pytest.raises(ValueError, match="router_balance_weight"):
        PEEKDOptions(router_balance_weight=-0.1).validate()


def test_the_routed_loss_covers_each_expert_on_its_own_examples_and_skips_absent_ones():
    torch.manual_seed(0)
    logits = torch.randn(6, 3, requires_grad=True)                    # B=6 examples, C=3, each its expert's
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assign = torch.tensor([0, 0, 2, 2, 2, 0])                          # experts 1 and 3 have no example
    method = PEEKD(SimpleNamespace(options=PEEKDOptions(num_experts=K, uncertainty_temperature=0.2)))
    loss, certainty, weights = method._expert_loss(logits, labels, assign)
    probs = logits.detach().softmax(-1)
    mine = {e: assign == e for e in (0, 2)}
    want_u = {e: ((probs[m].argmax(-1) == labels[m]).float() * probs[m].max(-1).values).mean() for e, m in mine.items()}
    assert certainty[1] == 0 and certainty[3] == 0 and weights[1] == 0 and weights[3] == 0
    torch.testing.assert_close(certainty[[0, 2]], torch.stack([want_u[0], want_u[2]]))
    torch.testing.assert_close(weights[[0, 2]], uncertainty_weights(torch.stack([want_u[0], want_u[2]]), 0.2))
    ce = {e: F.cross_entropy(logits[m], labels[m]) for e, m in mine.items()}
    torch.testing.assert_close(loss, weights[0] * ce[0] + weights[2] * ce[2])
    plain = PEEKD(SimpleNamespace(options=PEEKDOptions(num_experts=K, expert_weighting_loss="none")))
    loss, _, weights = plain._expert_loss(logits, labels, assign)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.0, 0.5, 0.0]))
    torch.testing.assert_close(loss, (ce[0] + ce[2]) / 2)


def test_the_router_gets_a_load_balancing_gradient():
    """All examples routed to expert 0: the balance term is ≈ K and its gradient lowers expert 0's
    router logit; at an even split with uniform probabilities it is 1. The expert logits get none."""
    router = torch.tensor([[4.0, 0.0, 0.0, 0.0]] * 8, requires_grad=True)
    assign = router.argmax(-1)
    logits = torch.randn(8, 2, requires_grad=True)
    labels = torch.randint(0, 2, (8,))
    grads = {}
    for weight in (0.0, 1.0):
        loss, balance = router_loss(router, assign, logits, labels, weight)
        grads[weight] = torch.autograd.grad(loss, router)[0]
        assert logits.grad is None
    assert 3.0 < balance < K
    push = grads[1.0] - grads[0.0]                                     # the balance term's own gradient
    assert (push[:, 0] > 0).all() and (push[:, 1:] < 0).all()         # descent lowers expert 0, raises the rest
    even = torch.zeros(8, K, requires_grad=True)
    _, balance = router_loss(even, torch.arange(8) % K, logits, labels, 1.0)
    assert balance == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_experts(tmp_path_factory):
    out = tmp_path_factory.mktemp("routing")
    torch.manual_seed(0)
    teacher, _ = build_tiny_models(str(out), task="sequence_classification", label_names=["negative", "positive"],
                                   vocab="good bad movie plot the a was very not".split())
    model = AUTO_CLASSES["sequence_classification"].from_pretrained(teacher)
    return PromptExperts(model, K, 2, kind="prefix", seed=0, backend="torch")


@pytest.mark.parametrize("routing", ["all", "one_per_batch", "hash", "learned"])
def test_each_routing_trains_exactly_the_experts_its_examples_go_to(tiny_experts, routing):
    method = PEEKD(SimpleNamespace(options=PEEKDOptions(num_experts=K, expert_routing=routing)))
    modules = {EXPERTS: tiny_experts}
    if routing == "learned":
        modules[ROUTER] = ExpertSelector(tiny_experts.model.config.hidden_size, K, 8)
    step = SimpleNamespace(modules=modules, stage=SimpleNamespace(modules=modules), model=tiny_experts,
                           global_step=6)
    batch = {"input_ids": torch.randint(5, 14, (8, 6)), "attention_mask": torch.ones(8, 6, dtype=torch.long),
             "labels": torch.randint(0, 2, (8,)), "example_id": torch.arange(100, 108)}
    tiny_experts.zero_grad()
    loss, logs = method._experts_step(step, batch)
    loss.backward()
    trained = {k for k in range(K) if tiny_experts.prompts.grad[k].abs().sum() > 0}
    if routing == "all":
        assert trained == set(range(K)) and "expert_share_0" not in logs
        return
    share = torch.stack([logs[f"expert_share_{k}"] for k in range(K)])
    assert trained == {k for k in range(K) if share[k] > 0} and share.sum() == pytest.approx(1.0)
    if routing == "one_per_batch":
        assert trained == {6 % K}
    elif routing == "hash":
        want = expert_assignment("hash", K, batch["example_id"], 0)
        torch.testing.assert_close(share, torch.bincount(want, minlength=K).float() / 8)
    else:
        router = modules[ROUTER].mlp[0].weight
        assert router.grad is not None and router.grad.abs().sum() > 0 and "router_balance" in logs
        modules[ROUTER].zero_grad()


def test_expert_agreement_skips_unlabelled_positions():
    labels = torch.tensor([[1, 0, -100], [0, -100, -100]])
    preds = [torch.tensor([[1, 1, 0], [0, 1, 1]]), torch.tensor([[1, 0, 1], [0, 0, 0]]),
             torch.tensor([[0, 0, 0], [1, 1, 1]])]
    assert expert_agreement(preds, labels) == {"0-1": pytest.approx(2 / 3), "0-2": 0.0, "1-2": pytest.approx(1 / 3)}


def test_a_learned_routing_run_logs_its_shares_and_reports_agreement(tmp_path):
    out = tmp_path / "run"
    assert main(small_args(out, method="pee_kd", num_experts=3, num_virtual_tokens=2, expert_num_train_epochs=1,
                           selector="none", expert_routing="learned")) == 0
    rows = [r for r in metrics_rows(out / "stages" / "experts" / "metrics.jsonl") if "expert_share_0" in r]
    assert rows and all(sum(r[f"expert_share_{k}"] for k in range(3)) == pytest.approx(1.0) for r in rows)
    assert all(0.0 < r["router_balance"] <= 3.0 for r in rows)                     # K·Σ f·P, at most K
    oracle = json.loads((out / "teacher_results.json").read_text())["oracle_routed"]
    assert set(oracle["pairwise_agreement"]) == {"0-1", "0-2", "1-2"}
    assert oracle["mean_pairwise_agreement"] == pytest.approx(sum(oracle["pairwise_agreement"].values()) / 3)
    assert oracle["oracle_gap"] >= 0.0


def test_a_learned_routing_experts_stage_resumes_exactly(tmp_path, monkeypatch):
    """Stopped mid-stage (after the checkpoint of step 4 of 12), the experts stage resumes with its
    router and ends with exactly the metrics of an uninterrupted run."""
    run = dict(method="pee_kd", num_experts=3, num_virtual_tokens=2, expert_num_train_epochs=1, selector="none",
               expert_routing="learned", per_device_train_batch_size=8, save_strategy="steps", save_steps=2,
               save_total_limit="None")
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert main(small_args(full, **run)) == 0
    step_once = PEEKD._experts_step

    def stop_at_step_5(self, step, batch):
        if step.global_step == 5:
            raise KeyboardInterrupt
        return step_once(self, step, batch)

    monkeypatch.setattr(PEEKD, "_experts_step", stop_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        main(small_args(stopped, **run))
    saved = checkpoint.list_checkpoints(str(stopped / "stages" / "experts"))
    assert saved[-1][0] == 4 and (Path(saved[-1][1]) / "router.safetensors").is_file()     # resumed, not restarted
    monkeypatch.setattr(PEEKD, "_experts_step", step_once)
    assert main(small_args(stopped, **run, resume_from_checkpoint="last")) == 0
    for name in ("stages/experts/metrics.jsonl", "metrics.jsonl"):
        assert metrics_rows(stopped / name) == metrics_rows(full / name), name
    assert (json.loads((stopped / "eval_results.json").read_text())
            == json.loads((full / "eval_results.json").read_text()))
