"""Meta-KD (kdengine/methods/meta_kd.py): prototype scores, the meta-teacher's domain-corruption loss, the
instance weights and each distillation term against hand computations; the captured pre-softmax
attention scores against transformers' eager attention; a whole run on the embedded task with its
per-domain table; each of the meta-teacher and distill stages stopped and resumed mid-stage; the Amazon
reviews reader; bad input stopped before Meta-KD trains anything."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from kdengine.data.amazon import read_amazon_split, split_indices
from kdengine.methods.meta_kd import (DISTILL, META_TEACHER, AttentionScores, MetaKD, MetaKDOptions,
                                      domain_feature_loss, instance_weights, mean_pool, meta_teacher_loss,
                                      prediction_loss, prototype_scores, weighted_hidden_loss)
from kdengine.train.__main__ import main
from tests.tolerances import assert_close
from tests.train import metrics_rows, read_json, small_args

SMALL = dict(method="meta_kd", save_strategy="steps", save_steps=2, save_total_limit=None)


# ---------------------------------------------------------------- the pieces, by hand

def test_prototype_scores_match_a_hand_computation():
    # Domain 0: (1, 0) and (1, 2) -> centroid (1, 1). Domain 1: (0, 2) -> centroid (0, 2).
    # Domain 2: (-2, 0) -> centroid (-2, 0).
    h = torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.0, 2.0], [-2.0, 0.0]])
    d = torch.tensor([0, 0, 1, 2])
    cos = lambda a, b: float(torch.dot(torch.tensor(a), torch.tensor(b)) /  # noqa: E731
                             (math.hypot(*a) * math.hypot(*b)))
    others = {0: [(0 - 2) / 2, (2 + 0) / 2], 1: [(1 - 2) / 2, (1 + 0) / 2], 2: [(1 + 0) / 2, (1 + 2) / 2]}
    own = {0: [1.0, 1.0], 1: [0.0, 2.0], 2: [-2.0, 0.0]}
    want = [0.5 * (cos(h[i].tolist(), own[int(d[i])]) + cos(h[i].tolist(), others[int(d[i])])) for i in range(4)]
    assert_close(prototype_scores(h, d, 3), torch.tensor(want), torch.float32)


def test_mean_pool_masked_skips_cls_and_padding_reference_keeps_padding():
    states = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)       # [B=2, L=4, H=1]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert mean_pool(states, mask, "masked").flatten().tolist() == [1.5, 5.0]     # (1+2)/2, 5
    assert mean_pool(states, mask, "reference").flatten().tolist() == [2.0, 6.0]  # (1+2+3)/3, (5+6+7)/3


def test_meta_teacher_loss_is_the_weighted_task_and_corrupted_domain_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    domain_logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.5, 0.5, 0.5]])
    labels, corrupted, weights = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1]), torch.tensor([0.9, 0.5, 1.0])
    ce = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1)), math.log(2)]
    dom = [math.log(math.e + 2) - 0, math.log(2 + math.exp(3)) - 0, math.log(3)]
    loss, mean_ce, mean_dom = meta_teacher_loss(logits, domain_logits, labels, corrupted, weights, 0.5)
    want = sum(w * (c + 0.5 * g) for w, c, g in zip(weights.tolist(), ce, dom)) / 3
    assert_close(loss, torch.tensor(want), torch.float32)
    assert_close(mean_ce, torch.tensor(sum(ce) / 3), torch.float32)
    assert_close(mean_dom, torch.tensor(sum(dom) / 3), torch.float32)
    no_domain, _, _ = meta_teacher_loss(logits, domain_logits, labels, corrupted, weights, 0.0)
    assert_close(no_domain, torch.tensor(sum(w * c for w, c in zip(weights.tolist(), ce)) / 3), torch.float32)


def test_instance_weights_are_one_plus_t_times_the_domain_expertise_weight():
    # p_T(y|x) = 1 -> e = 1/(1+e^0) = 1/2; p = 1/2 -> e = 1/(1+e^(1/4)); p = 0 -> e = 1/(1+e).
    logits = torch.tensor([[0.0, 100.0], [0.0, 0.0], [100.0, 0.0]])
    labels = torch.tensor([1, 0, 1])
    t = torch.tensor([0.9, 0.5, -0.2])
    want = torch.tensor([1.9 * 0.5, 1.5 / (1 + math.exp(0.25)), 0.8 / (1 + math.e)])
    assert_close(instance_weights(logits, labels, t), want, torch.float32)


@pytest.mark.parametrize("scale", [1.0, 0.01])       # 0.01: Σω < 1, below the clamp of hidden_state_loss
def test_weighted_hidden_loss_is_the_mean_of_weighted_per_example_token_means(scale):
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    student = [torch.randn(3, 4, 5, dtype=torch.float64) for _ in range(3)]
    teacher = [torch.randn(3, 4, 5, dtype=torch.float64) for _ in range(7)]
    weights = torch.tensor([0.3, 0.9, 0.6], dtype=torch.float64) * scale
    pairs = [(0, 0), (1, 3), (2, 6)]
    want = 0.0
    for b in range(3):
        n = int(mask[b].sum())
        per = sum(float((student[s][b, :n] - teacher[t][b, :n]).pow(2).mean()) for s, t in pairs)
        want += float(weights[b]) * per / 3
    got = weighted_hidden_loss(student, teacher, pairs, mask, weights)
    assert_close(got, torch.tensor(want, dtype=torch.float64), torch.float32)


def test_domain_feature_loss_is_the_weighted_per_example_mean_squared_error():
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    weights = torch.tensor([0.5, 0.25])
    loss = domain_feature_loss(student, teacher, weights)
    assert_close(loss, torch.tensor((0.5 * (1 + 4) / 2 + 0.25 * (9 + 1) / 2) / 2), torch.float32)
    loss.backward()
    assert_close(student.grad, torch.tensor([[0.5 * 2 * 1 / 2 / 2, 0.5 * 2 * 2 / 2 / 2],
                                             [0.25 * 2 * -3 / 2 / 2, 0.25 * 2 * -1 / 2 / 2]]), torch.float32)


@pytest.mark.parametrize("weighted", [False, True])
def test_prediction_loss_is_the_soft_cross_entropy_with_instance_weights_as_row_weights(weighted):
    student = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.5, 0.5]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 1.0]])
    labels, weights = torch.tensor([1, 0, 1]), torch.tensor([0.4, 0.8, 0.6])
    options = MetaKDOptions(kd_temperature=2.0, hard_weight=0.5)
    p, log_q = torch.softmax(teacher / 2, -1), torch.log_softmax(student / 2, -1)
    rows = -(p * log_q).sum(-1) * 4                                               # T² · SCE per row
    kd_want = (rows * weights).mean() if weighted else rows.mean()
    ce_want = F.cross_entropy(student, labels)
    loss, kd, ce = prediction_loss(student, teacher, labels, weights if weighted else None, options, "torch")
    assert_close(kd, kd_want, torch.float32)
    assert_close(loss, kd_want + 0.5 * ce_want, torch.float32)


def test_captured_attention_scores_are_the_pre_softmax_scores_of_eager_attention():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=32, attn_implementation="eager")
    model = BertModel(config).eval()
    ids = torch.randint(1, 30, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with AttentionScores(model, "a BERT") as captured:
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        scores = captured.scores()
    assert not captured.handles and len(scores) == 2
    for raw, probabilities in zip(scores, out.attentions):
        masked = raw.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        assert_close(torch.softmax(masked, -1), probabilities, torch.float32)


# ---------------------------------------------------------------- a whole run

@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("meta_kd") / "run"
    assert main(small_args(out, **SMALL)) == 0
    return out


def test_the_embedded_run_writes_every_stage_the_prototypes_and_a_per_domain_table(embedded_run, capsys):
    out = embedded_run
    prototypes = read_json(out / "prototype_scores.json")
    assert len(prototypes["scores"]) == 96 and all(-1 <= t <= 1 for t in prototypes["scores"])
    assert prototypes["key"] == {"encoder": "teacher", "pooling": "masked", "num_examples": 96}
    for stage in (META_TEACHER, DISTILL):
        assert read_json(out / stage / "stage_complete.json")["global_step"] > 0
    teacher_rows = [r for r in metrics_rows(out / "stages" / META_TEACHER / "metrics.jsonl") if "ce_loss" in r]
    assert teacher_rows and all(r["domain_loss"] > 0 for r in teacher_rows)
    distill_rows = [r for r in metrics_rows(out / "stages" / DISTILL / "metrics.jsonl") if "hidden_loss" in r]
    assert distill_rows and all(r["hidden_loss"] > 0 and r["attention_loss"] > 0 and r["domain_loss"] > 0
                                and 0 < r["instance_weight"] <= 1 for r in distill_rows)
    domains = read_json(out / "domain_results.json")
    assert set(domains["rows"]) == {"teacher", "meta_teacher", "meta_kd_student"}
    evaluated = read_json(out / "eval_results.json")
    student = domains["rows"]["meta_kd_student"]
    assert student["eval_accuracy"] == evaluated["eval_accuracy"]
    for domain in ("books", "electronics", "kitchen", "movies"):
        assert evaluated[f"eval_{domain}_accuracy"] == student[f"eval_{domain}_accuracy"]
    assert "meta_teacher" in read_json(out / "teacher_results.json")


def test_the_distillation_stages_train_on_a_fraction_of_the_target_domain_only(tmp_path):
    from kdengine.data.synthetic import make_synthetic_split

    out = tmp_path / "run"
    assert main(small_args(out, **SMALL, target_domain="books", target_train_fraction=0.5)) == 0
    books = sum(ex["domain"] == "books" for ex in make_synthetic_split(42, "train", 96))
    assert read_json(out / META_TEACHER / "stage_complete.json")["train_samples"] == 96
    for stage_dir in (out / DISTILL / "stage_complete.json", out / "train_results.json"):
        assert read_json(stage_dir)["train_samples"] == math.floor(0.5 * books)
    assert read_json(out / "domain_results.json")["target_domain"] == "books"


class Stop(Exception):
    """Raised inside a stage to stop a run as a kill would."""


def _stopping_step(stage: str):
    """MetaKD.training_step, raising Stop at step 3 of ``stage`` (after its checkpoint at step 2)."""
    step = MetaKD.training_step

    def stop(self, context, batch):
        if context.stage.name == stage and context.global_step == 3:
            raise Stop
        return step(self, context, batch)
    return stop


@pytest.mark.parametrize("stage", [META_TEACHER, DISTILL])
def test_a_run_stopped_mid_stage_resumes_it(stage, embedded_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(MetaKD, "training_step", _stopping_step(stage))
    with pytest.raises(Stop):
        main(small_args(out, **SMALL))
    monkeypatch.undo()
    checkpoints = sorted(path.name for path in (out / "stages" / stage).glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2"] and not (out / stage).exists()
    assert main(small_args(out, **SMALL, resume_from_checkpoint="last")) == 0
    logs = (f"stages/{META_TEACHER}/metrics.jsonl", f"stages/{DISTILL}/metrics.jsonl", "metrics.jsonl")
    same = {path: metrics_rows(out / path) == metrics_rows(embedded_run / path) for path in logs}
    assert all(same.values()), same
    assert read_json(out / "eval_results.json") == read_json(embedded_run / "eval_results.json")


# ---------------------------------------------------------------- the Amazon reviews

def _review(text: str) -> str:
    return f"<review>\n<title>\nt\n</title>\n<review_text>\n{text}\n</review_text>\n</review>\n"


def _amazon(tmp_path, per_file: int = 20, empty: str | None = None):
    root = tmp_path / "sorted_data_acl"
    for folder in ("books", "dvd", "electronics", "kitchen_&_housewares"):
        (root / folder).mkdir(parents=True)
        for label in ("positive", "negative"):
            count = 0 if folder == empty else per_file
            (root / folder / f"{label}.review").write_text(
                "".join(_review(f"{folder} {label} {i}") for i in range(count)), encoding="utf-8")
    return root


def test_the_amazon_reader_splits_stratified_with_domains_and_labels_from_the_files(tmp_path):
    root = _amazon(tmp_path)
    splits = {name: read_amazon_split(f"{root}#{name}") for name in ("train", "dev", "test")}
    sizes = {name: len(split.examples) for name, split in splits.items()}
    assert sizes == {"train": 130, "dev": 14, "test": 16}          # 160 reviews: 8 + 7 per label, then 10 %
    texts = [ex["text"] for split in splits.values() for ex in split.examples]
    assert len(set(texts)) == 160                                   # disjoint and complete
    for split in splits.values():
        labels = [ex["label"] for ex in split.examples]
        assert labels.count("positive") == labels.count("negative")
        for ex, where in zip(split.examples, split.where):
            domain, label, _ = ex["text"].split()
            assert ex["label"] == label and ex["domain"] == {"kitchen_&_housewares": "kitchen"}.get(domain, domain)
            assert where.endswith(".review:" + where.rsplit(":", 1)[1]) and label in where
    assert split_indices(["a"] * 10 + ["b"] * 10) == split_indices(["a"] * 10 + ["b"] * 10)


# ---------------------------------------------------------------- bad input, before Meta-KD trains

def _refused(tmp_path, capsys, *flags, **options) -> str:
    out = tmp_path / "refused"
    assert main(small_args(out, **{**SMALL, **options}) + list(flags)) == 2
    assert not out.exists()        # refused before any work (Method.check_run): nothing written
    return " ".join(capsys.readouterr().err.split())


def test_data_without_domains_is_refused(tmp_path, capsys):
    from kdengine.data.synthetic import LABEL_NAMES, make_synthetic_split, synthetic_vocab
    from kdengine.tiny_models import build_tiny_models

    teacher, student = build_tiny_models(str(tmp_path / "models"), task="sequence_classification",
                                         label_names=LABEL_NAMES, vocab=synthetic_vocab(), seed=0)
    for split, n in (("train", 48), ("validation", 16)):
        rows = make_synthetic_split(0, split, n)
        (tmp_path / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(
            f"{r['text']}\t{LABEL_NAMES[r['label']]}\n" for r in rows), encoding="utf-8")
    err = _refused(tmp_path, capsys, train_file=tmp_path / "train.tsv", validation_file=tmp_path / "validation.tsv",
                   teacher_model_name_or_path=teacher, model_name_or_path=student)
    assert "method meta_kd needs a domain per training example and the training data has none" in err


def test_a_target_domain_absent_from_the_data_is_refused(tmp_path, capsys):
    err = _refused(tmp_path, capsys, target_domain="garden")
    assert "target_domain 'garden' is not a domain of the training data; its domains: books, electronics, " \
           "kitchen, movies" in err


def test_a_target_fraction_leaving_no_example_is_refused(tmp_path, capsys):
    err = _refused(tmp_path, capsys, target_domain="books", target_train_fraction=0.01)
    assert "target_train_fraction 0.01 of the training examples of target_domain 'books' leaves none" in err


def test_a_domain_without_reviews_is_refused_when_the_data_is_read(tmp_path):
    root = _amazon(tmp_path, per_file=3, empty="dvd")
    with pytest.raises(ValueError, match="domain folder .*dvd' holds no review .* every domain needs training"):
        read_amazon_split(f"{root}#train")


def test_a_layer_map_beyond_the_models_depth_is_refused(tmp_path, capsys):
    err = _refused(tmp_path, capsys, layer_map="1:2,2:9")
    assert "layer_map pair 2:9 names teacher layer 9, but the student has 2 layers and the meta-teacher 4" in err


def test_a_layer_map_for_several_teachers_is_refused_at_parse_time(capsys):
    assert main(["--method", "meta_kd", "--layer_map", "1:2;1:3"]) == 2
    assert "Meta-KD has one teacher" in capsys.readouterr().err
