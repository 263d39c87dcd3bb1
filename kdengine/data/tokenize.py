"""Tokenize a split into model inputs and collate batches (right padding to the longest).

Items of the tokenized dataset::

    {"input_ids": list[int], "attention_mask": list[int], "labels": int | list[int],
     "example_id": int, ["token_type_ids": list[int]], ["domain": int]}

* ``example_id`` is the example's index in its split, so a method can key per-example data.
* ``token_type_ids`` is present when the tokenizer produces it (BERT-style segment ids for
  sentence pairs); models that do not take it should use a tokenizer that does not return it.
* Sequence classification: ``labels`` is the class id, or -100 for an unlabeled (test) example.
* Token classification: ``labels`` has one entry per token; the word's tag id on the FIRST
  sub-token of each word and -100 on the other sub-tokens and on special tokens (see
  ``label_all_tokens``). Words cut off by truncation have no label anywhere.
* Causal LM: prompt + response + eos; ``labels[t]`` = the next token on response positions
  (already shifted: logits at t predict it), -100 on the prompt (not trained on) and at the end.
"""

from __future__ import annotations

import torch

from kdengine.constants import IGNORE_INDEX, TASKS


class TokenizedDataset(torch.utils.data.Dataset):
    """A list of tokenized items (dicts of python ints/lists) as a map-style torch Dataset."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def _check_common(task: str, max_seq_length) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ValueError(
            f"max_seq_length must be an integer >= 2 (room for the special tokens), got {max_seq_length!r}"
        )


def _continuation_ids(label_names: list[str] | None) -> dict[int, int]:
    """Map each B-X tag id to the I-X tag id (when both exist) for continuation sub-tokens."""
    if label_names is None:
        return {}
    index = {name: i for i, name in enumerate(label_names)}
    return {
        i: index["I-" + name[2:]]
        for name, i in index.items()
        if name.startswith("B-") and "I-" + name[2:] in index
    }


def _tokenize_sequence_classification(examples, tokenizer, max_seq_length, domain_names) -> list[dict]:
    has_pair = [ex.get("text_pair") is not None for ex in examples]
    if any(has_pair) and not all(has_pair):
        raise ValueError(
            f"example {has_pair.index(not has_pair[0])} differs from example 0 in having a text_pair; "
            "either every example of a split has one or none has"
        )
    texts = [ex["text"] for ex in examples]
    pairs = [ex["text_pair"] for ex in examples] if has_pair[0] else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_seq_length)
    items = []
    for i, ex in enumerate(examples):
        item = {key: encoded[key][i] for key in encoded.keys()}
        item["labels"] = IGNORE_INDEX if ex.get("label") is None else int(ex["label"])
        item["example_id"] = i
        if domain_names is not None:
            if ex.get("domain") not in domain_names:
                raise ValueError(f"example {i}: domain {ex.get('domain')!r} is not one of the domains {domain_names} "
                                 "(every example needs a domain of the training split)")
            item["domain"] = domain_names.index(ex["domain"])
        items.append(item)
    return items


def _tokenize_token_classification(examples, tokenizer, max_seq_length, label_all_tokens, label_names):
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"token classification needs a fast tokenizer (word_ids() aligns labels to words); "
            f"got {type(tokenizer).__name__}. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    for i, ex in enumerate(examples):
        if not ex["tokens"] or len(ex["tokens"]) != len(ex["tags"]):
            raise ValueError(
                f"example {i}: expected a non-empty 'tokens' list and one tag per token, "
                f"got {len(ex['tokens'])} tokens and {len(ex['tags'])} tags"
            )
    continuation = _continuation_ids(label_names)
    encoded = tokenizer(
        [ex["tokens"] for ex in examples],
        is_split_into_words=True,
        truncation=True,
        max_length=max_seq_length,
    )
    items = []
    for i, ex in enumerate(examples):
        labels, previous = [], None
        for word in encoded.word_ids(i):
            if word is None:
                labels.append(IGNORE_INDEX)
            elif word != previous:
                labels.append(int(ex["tags"][word]))
            elif label_all_tokens:
                tag = int(ex["tags"][word])
                labels.append(continuation.get(tag, tag))
            else:
                labels.append(IGNORE_INDEX)
            previous = word
        item = {key: encoded[key][i] for key in encoded.keys()}
        item["labels"] = labels
        item["example_id"] = i
        items.append(item)
    return items


def eos_token_id(tokenizer) -> int:
    """The id that ends a causal_lm response: the tokenizer's eos, else its sep."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither an eos nor a sep token to end the responses")
    return eos


def _tokenize_causal_lm(examples, tokenizer, max_seq_length) -> list[dict]:
    """prompt + response + eos, truncated to ``max_seq_length``; ``labels[t]`` is the token position
    t predicts (``input_ids[t + 1]``) on response positions and IGNORE_INDEX elsewhere, so the
    logits [B, L, V] and labels [B, L] line up without a shift."""
    eos = eos_token_id(tokenizer)
    prompts = tokenizer([ex["prompt"] for ex in examples], add_special_tokens=False)["input_ids"]
    responses = tokenizer([ex["response"] for ex in examples], add_special_tokens=False)["input_ids"]
    items = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        if not prompt or len(prompt) >= max_seq_length:
            raise ValueError(f"example {i}: the prompt has {len(prompt)} tokens; causal_lm needs 1 to "
                             f"max_seq_length - 1 = {max_seq_length - 1} prompt tokens (raise max_seq_length)")
        ids = (prompt + response + [eos])[:max_seq_length]
        labels = [IGNORE_INDEX] * (len(prompt) - 1) + ids[len(prompt):] + [IGNORE_INDEX]
        items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "example_id": i})
    return items


def tokenize_split(
    examples: list[dict],
    tokenizer,
    task: str,
    max_seq_length: int,
    *,
    label_all_tokens: bool = False,
    label_names: list[str] | None = None,
    domain_names: list[str] | None = None,
) -> TokenizedDataset:
    """Tokenize one split (a list of TaskData examples) with ``tokenizer.__call__``.

    Truncates to ``max_seq_length`` tokens (special tokens included). Token classification needs
    a fast tokenizer and aligns tag ids to words with ``word_ids``. With ``label_all_tokens`` the
    continuation sub-tokens get the word's tag too (as in the Hugging Face NER example); pass
    ``label_names`` to turn a B-X there into I-X, so that seqeval does not count extra entities.
    Evaluate with ``label_all_tokens=False``: then exactly one label per (kept) word. With
    ``domain_names`` (sequence classification), each item also gets ``domain``: the index of its
    example's domain in that list (ValueError for a domain outside it).
    """
    _check_common(task, max_seq_length)
    if not examples:
        raise ValueError("tokenize_split got an empty split")
    if task == "sequence_classification":
        items = _tokenize_sequence_classification(examples, tokenizer, max_seq_length, domain_names)
    elif task == "causal_lm":
        items = _tokenize_causal_lm(examples, tokenizer, max_seq_length)
    else:
        items = _tokenize_token_classification(
            examples, tokenizer, max_seq_length, label_all_tokens, label_names
        )
    return TokenizedDataset(items)


def make_collate_fn(tokenizer, task: str):
    """Return ``collate(items) -> dict[str, LongTensor]`` padding each batch to its longest item.

    Right padding with the tokenizer's pad token (``attention_mask`` 0 and, for token
    classification, ``labels`` -100 on padding). Built on transformers' ``DataCollatorWithPadding``
    / ``DataCollatorForTokenClassification``. Shapes: ``input_ids``, ``attention_mask``
    (``token_type_ids``) [B, L]; ``labels`` [B] or [B, L] (token classification, causal LM);
    ``example_id`` and ``domain`` [B].
    """
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    _check_common(task, 2)
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no pad token; set tokenizer.pad_token (e.g. to the "
            "eos token) before collating"
        )
    if tokenizer.padding_side != "right":
        raise ValueError(
            f"the collate function pads on the right; tokenizer.padding_side is "
            f"{tokenizer.padding_side!r} (set it to 'right')"
        )
    if task in ("token_classification", "causal_lm"):
        collator = DataCollatorForTokenClassification(
            tokenizer, label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
        )
    else:
        collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def collate(items: list[dict]) -> dict:
        return dict(collator(items))

    return collate
