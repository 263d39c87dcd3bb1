"""The Amazon multi-domain sentiment reviews (Blitzer, Dredze, Pereira 2007; ``sorted_data_acl``), the
multi-domain data of Meta-KD.

A source is ``<sorted_data_acl directory>#<split>``, split ``train``, ``dev`` or ``test``, e.g.
``train_file: ../shared/data/amazon-multi-domain-sentiment/sorted_data_acl#train``. The directory
holds one folder per domain (books, dvd, electronics, kitchen_&_housewares, named kitchen here) with
``positive.review`` and ``negative.review``: pseudo-XML without a root element, one ``<review>`` per
record; the text is its ``<review_text>``, the label comes from the file name, the domain from the
folder.

The split is Meta-KD's (``generate_senti_data.py``): across all domains, stratified by sentiment, 10 %
test, then 10 % of the rest as dev (9 % of the whole), the remaining 81 % train, drawn with a fixed
seed (11111, the reference's). Each label's reviews are permuted by Python's ``random`` with that seed,
so the split is the reference's in proportions, not in the exact reviews (it used numpy and
scikit-learn's StratifiedKFold).
"""

from __future__ import annotations

import os
import random
import re

from kdengine.data.readers import RawSplit, _check_file

SPLITS = ("train", "dev", "test")
DOMAIN_DIRS = {"books": "books", "dvd": "dvd", "electronics": "electronics", "kitchen_&_housewares": "kitchen"}
LABEL_FILES = {"negative.review": "negative", "positive.review": "positive"}
SEED = 11111
_REVIEW = re.compile(r"<review>(.*?)</review>", re.S)
_TEXT = re.compile(r"<review_text>(.*?)</review_text>", re.S)


def is_amazon_source(path: str) -> bool:
    """Whether ``path`` names a split of the reviews (``<directory>#train|dev|test``)."""
    return "#" in path and path.rsplit("#", 1)[1] in SPLITS


def read_reviews(directory: str) -> tuple[list[dict], list[str]]:
    """Every review of ``directory`` (examples with text, label, domain) and where each is (file:line)."""
    if not os.path.isdir(directory):
        raise ValueError(f"Amazon reviews: {directory!r} is not a directory; expected the sorted_data_acl folder "
                         f"with the domains {', '.join(DOMAIN_DIRS)}")
    present = [d for d in DOMAIN_DIRS if os.path.isdir(os.path.join(directory, d))]
    if not present:
        raise ValueError(f"Amazon reviews: {directory!r} has none of the domain folders {', '.join(DOMAIN_DIRS)}")
    examples, where = [], []
    for folder in present:
        count = 0
        for file_name, label in LABEL_FILES.items():
            path = os.path.join(directory, folder, file_name)
            if not os.path.isfile(path):
                continue
            _check_file(path)
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            for match in _REVIEW.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                body = _TEXT.search(match.group(1))
                if body is None or not body.group(1).strip():
                    raise ValueError(f"{path}:{line}: a <review> without <review_text>")
                examples.append({"text": " ".join(body.group(1).split()), "text_pair": None, "label": label,
                                 "domain": DOMAIN_DIRS[folder]})
                where.append(f"{path}:{line}")
                count += 1
        if count == 0:
            raise ValueError(f"Amazon reviews: domain folder {os.path.join(directory, folder)!r} holds no review "
                             f"(expected {' and '.join(LABEL_FILES)}); every domain needs training examples")
    return examples, where


def split_indices(labels: list[str], seed: int = SEED) -> dict[str, list[int]]:
    """{split: example indices}: per label, a seeded permutation; its first 10 % test, the next 10 % of
    the rest dev, the remaining train. Each split is in a seeded random order, so that its first N
    examples (``max_train_samples``) mix the domains and labels."""
    out = {name: [] for name in SPLITS}
    rng = random.Random(seed)
    for label in sorted(set(labels)):
        members = [i for i, value in enumerate(labels) if value == label]
        rng.shuffle(members)
        n_test = round(len(members) / 10)
        n_dev = round((len(members) - n_test) / 10)
        out["test"] += members[:n_test]
        out["dev"] += members[n_test:n_test + n_dev]
        out["train"] += members[n_test + n_dev:]
    for ids in out.values():
        rng.shuffle(ids)
    return out


def read_amazon_split(source: str) -> RawSplit:
    """The split named by ``source`` (``<directory>#<split>``)."""
    directory, split = source.rsplit("#", 1)
    examples, where = read_reviews(directory)
    ids = split_indices([ex["label"] for ex in examples])[split]
    return RawSplit(source=source, examples=[examples[i] for i in ids], where=[where[i] for i in ids])
