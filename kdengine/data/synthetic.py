"""The embedded default task: a synthetic multi-domain sentiment language (no downloads).

Each example is a short review in one of four domains (books, electronics, kitchen, movies),
written from templates, with a binary label ("negative" / "positive"). The language is built
so that word counts are not enough and a small model has to read in context:

* shared sentiment words ("great", "awful") mean the same everywhere;
* domain words ("gripping", "flimsy") only occur in their domain;
* domain-dependent words flip polarity with the domain ("unpredictable" is good for a movie
  plot and bad for a blender; "long" is good for a battery and bad for a novel), so a prompt
  expert per domain has something to specialise on;
* "not" before an adjective negates it; intensifiers ("very", "really") carry no polarity;
* "X but Y": the clause after "but" decides (the first clause usually says the opposite);
* a few percent of labels are flipped (label noise), so the clean ceiling is below 100 %.

With the default sizes (seeds 0-4), a bag-of-words logistic regression reaches 76-79 % on
validation, the same regression on context features (the clause after "but", "not" merged
into the next adjective, crossed with the domain) 93-95 %, and the label noise caps any model
near 97 % (checked in tests/data/test_synthetic.py). Generation is deterministic given the
seed, and each split has its own random stream, so changing ``n_train`` does not change the
validation or test examples.
"""

from __future__ import annotations

import random

from kdengine.data import TaskData

LABEL_NAMES = ["negative", "positive"]
DOMAINS = ("books", "electronics", "kitchen", "movies")

_NOUNS = {
    "books": ["novel", "plot", "author", "story", "chapter", "ending", "book", "prose"],
    "electronics": ["laptop", "battery", "screen", "charger", "speaker", "phone", "keyboard", "camera"],
    "kitchen": ["blender", "pan", "kettle", "knife", "toaster", "mixer", "pot", "lid"],
    "movies": ["film", "movie", "actor", "script", "soundtrack", "scene", "director", "sequel"],
}
# Polarity (1 positive, 0 negative) of words that mean the same in every domain.
_SHARED = {
    1: ["great", "good", "excellent", "wonderful", "solid", "impressive"],
    0: ["bad", "awful", "terrible", "poor", "disappointing", "mediocre"],
}
_DOMAIN_WORDS = {
    "books": {1: ["gripping", "insightful", "moving"], 0: ["tedious", "shallow", "clumsy"]},
    "electronics": {1: ["responsive", "sturdy", "crisp"], 0: ["laggy", "flimsy", "glitchy"]},
    "kitchen": {1: ["sharp", "spotless", "sturdy"], 0: ["dull", "rusty", "wobbly"]},
    "movies": {1: ["hilarious", "stunning", "moving"], 0: ["boring", "wooden", "cheesy"]},
}
# Words whose polarity depends on the domain: {word: {domain: polarity}}.
_FLIP_WORDS = {
    "unpredictable": {"books": 1, "movies": 1, "electronics": 0, "kitchen": 0},
    "long": {"electronics": 1, "kitchen": 1, "books": 0, "movies": 0},
    "quiet": {"electronics": 1, "kitchen": 1, "books": 0, "movies": 0},
    "simple": {"electronics": 1, "kitchen": 1, "books": 0, "movies": 0},
    "dark": {"books": 1, "movies": 1, "electronics": 0, "kitchen": 0},
    "heavy": {"kitchen": 1, "books": 1, "electronics": 0, "movies": 0},
}
_INTENSIFIERS = ["very", "really", "quite", "truly", "extremely", "rather"]
_OPENERS = ["", "", "honestly ,", "overall ,", "i think", "to be fair ,", "in my opinion ,"]
_VERBS = ["is", "was", "seems", "felt"]
_DETERMINERS = ["the", "this", "my", "that"]

# Mixture of sentence shapes (fractions of the examples).
P_CONTRAST = 0.2  # "<clause> but <clause>"
P_NEGATION = 0.1  # "not" in a clause
P_FLIP_WORD = 0.15  # the deciding adjective is a domain-dependent word
P_INTENSIFIER = 0.4
P_SECOND_SAME = 0.15  # "<clause> and <clause>" with the same polarity
LABEL_NOISE = 0.03


def synthetic_vocab() -> list[str]:
    """Every word the generator can emit, sorted (special tokens are not included)."""
    words = {"not", "but", "and", "."}
    for nouns in _NOUNS.values():
        words.update(nouns)
    for polar in (_SHARED, *_DOMAIN_WORDS.values()):
        for adjectives in polar.values():
            words.update(adjectives)
    words.update(_FLIP_WORDS, _INTENSIFIERS, _VERBS, _DETERMINERS)
    for opener in _OPENERS:
        words.update(opener.split())
    return sorted(words)


def _adjective(rng: random.Random, domain: str, polarity: int, use_flip: bool) -> str:
    if use_flip:
        return rng.choice([w for w, by_domain in _FLIP_WORDS.items() if by_domain[domain] == polarity])
    return rng.choice(_SHARED[polarity] + _DOMAIN_WORDS[domain][polarity])


def _clause(rng: random.Random, domain: str, polarity: int, *, negate: bool, use_flip: bool) -> list[str]:
    """One clause, ``<det> <noun> <verb> [not] [intensifier] <adj>``, meaning ``polarity``."""
    adjective = _adjective(rng, domain, 1 - polarity if negate else polarity, use_flip)
    words = [rng.choice(_DETERMINERS), rng.choice(_NOUNS[domain]), rng.choice(_VERBS)]
    if negate:
        words.append("not")
    if rng.random() < P_INTENSIFIER:
        words.append(rng.choice(_INTENSIFIERS))
    words.append(adjective)
    return words


def _example(rng: random.Random, noise: float) -> dict:
    domain = rng.choice(DOMAINS)
    label = rng.randrange(2)

    def clause(polarity: int) -> list[str]:
        return _clause(
            rng, domain, polarity, negate=rng.random() < P_NEGATION, use_flip=rng.random() < P_FLIP_WORD
        )

    words = rng.choice(_OPENERS).split()
    if rng.random() < P_CONTRAST:
        # The clause after "but" decides; the first one mostly says the opposite.
        first = 1 - label if rng.random() < 0.8 else label
        words += clause(first) + ["but"] + clause(label)
    else:
        words += clause(label)
        if rng.random() < P_SECOND_SAME:
            words += ["and"] + clause(label)
    words.append(".")
    if rng.random() < noise:
        label = 1 - label
    return {"text": " ".join(words), "text_pair": None, "label": label, "domain": domain}


def make_synthetic_split(seed: int, split: str, n: int, *, noise: float = LABEL_NOISE) -> list[dict]:
    """``n`` examples of one split; the random stream depends only on (seed, split)."""
    rng = random.Random(f"kdengine-synthetic:{seed}:{split}")
    return [_example(rng, noise) for _ in range(n)]


def make_synthetic_task(
    seed: int = 0,
    n_train: int = 3000,
    n_validation: int = 600,
    n_test: int = 600,
    *,
    noise: float = LABEL_NOISE,
) -> TaskData:
    """The synthetic multi-domain sentiment task (sequence classification, "domain" filled).

    ``noise`` is the probability that a label is flipped. A split with 0 examples is None
    (train needs at least one).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"synthetic seed must be an integer, got {seed!r}")
    for name, n in (("n_train", n_train), ("n_validation", n_validation), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"synthetic {name} must be an integer >= 0, got {n!r}")
    if n_train == 0:
        raise ValueError("synthetic n_train must be >= 1: the training split cannot be empty")
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"synthetic noise must be in [0, 0.5), got {noise!r}")
    return TaskData(
        task="sequence_classification",
        label_names=list(LABEL_NAMES),
        train=make_synthetic_split(seed, "train", n_train, noise=noise),
        validation=make_synthetic_split(seed, "validation", n_validation, noise=noise) or None,
        test=make_synthetic_split(seed, "test", n_test, noise=noise) or None,
    )


def instruction_vocab() -> list[str]:
    """:func:`synthetic_vocab` plus the words of the instruction task's responses (domains, labels)."""
    return sorted(set(synthetic_vocab()) | set(DOMAINS) | set(LABEL_NAMES))


def make_synthetic_instruction_task(seed: int = 0, n_train: int = 3000, n_validation: int = 600,
                                    n_test: int = 600, *, noise: float = LABEL_NOISE) -> TaskData:
    """The synthetic reviews as a causal-LM instruction task (``task="causal_lm"``): the prompt is the
    review, the response ``"<domain> <label>"`` (e.g. ``"kitchen positive"``), its words in
    :func:`instruction_vocab`. Same examples (and label noise) as :func:`make_synthetic_task`."""
    data = make_synthetic_task(seed, n_train, n_validation, n_test, noise=noise)

    def instructions(split):
        if split is None:
            return None
        return [{"prompt": ex["text"], "response": f"{ex['domain']} {LABEL_NAMES[ex['label']]}"} for ex in split]

    return TaskData(task="causal_lm", label_names=[], train=instructions(data.train),
                    validation=instructions(data.validation), test=instructions(data.test))
