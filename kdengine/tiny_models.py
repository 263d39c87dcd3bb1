"""Tiny randomly-initialised BERT (or GPT-2) teacher/student pairs with a word-level tokenizer, saved offline.

The embedded run (synthetic task, no downloads) trains a teacher and a student from these.
``build_tiny_models`` writes two self-contained model folders (``config.json``,
``model.safetensors``, tokenizer files) that ``AutoTokenizer`` and
``AutoModelFor{Sequence,Token}Classification`` / ``AutoModelForCausalLM.from_pretrained`` load with no
network.
"""

from __future__ import annotations

import os

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEACHER_DEFAULTS = dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=512)
STUDENT_DEFAULTS = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=256)
# causal_lm: GPT-2 teacher and student (GPT2Config field names).
LM_TEACHER_DEFAULTS = dict(n_layer=2, n_embd=64, n_head=2)
LM_STUDENT_DEFAULTS = dict(n_layer=1, n_embd=32, n_head=2)
MAX_POSITIONS = 512


def build_word_tokenizer(vocab: list[str]):
    """A ``PreTrainedTokenizerFast`` over a tokenizers ``WordLevel`` model.

    Ids: the special tokens [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, then ``vocab`` in order.
    Text is split on whitespace only (a vocabulary word is one token; anything else is [UNK]);
    single inputs become ``[CLS] a [SEP]``, pairs ``[CLS] a [SEP] b [SEP]`` with segment ids 0/1.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if not vocab:
        raise ValueError("vocab is empty; expected a list of words")
    clashes = sorted(set(vocab) & set(SPECIAL_TOKENS))
    if clashes:
        raise ValueError(f"vocab must not contain the special tokens {clashes}; they are added automatically")
    if len(set(vocab)) != len(vocab):
        duplicates = sorted({w for w in vocab if vocab.count(w) > 1})
        raise ValueError(f"vocab has duplicate words: {duplicates[:10]}")
    bad = [w for w in vocab if not isinstance(w, str) or not w or any(c.isspace() for c in w)]
    if bad:
        raise ValueError(f"vocab words must be non-empty strings without whitespace, got {bad[:10]}")
    ids = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *vocab])}
    tokenizer = Tokenizer(models.WordLevel(vocab=ids, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def _bert_config(shape: dict, defaults: dict, role: str, vocab_size: int, label_names: list[str]):
    from transformers import BertConfig

    values = {**defaults, **(shape or {})}
    known = BertConfig().to_dict()
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise ValueError(f"{role}: unknown BertConfig options {unknown}")
    if values["hidden_size"] % values["num_attention_heads"]:
        raise ValueError(
            f"{role}: hidden_size {values['hidden_size']} is not a multiple of "
            f"num_attention_heads {values['num_attention_heads']}"
        )
    return BertConfig(
        vocab_size=vocab_size,
        max_position_embeddings=MAX_POSITIONS,
        type_vocab_size=2,
        pad_token_id=SPECIAL_TOKENS.index("[PAD]"),
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        **values,
    )


def _gpt2_config(shape: dict, defaults: dict, role: str, tokenizer):
    from transformers import GPT2Config

    values = {**defaults, **(shape or {})}
    unknown = sorted(k for k in values if k not in GPT2Config().to_dict())
    if unknown:
        raise ValueError(f"{role}: unknown GPT2Config options {unknown}")
    eos = tokenizer.sep_token_id  # the word tokenizer's [SEP] ends responses (kdengine.data.tokenize)
    return GPT2Config(vocab_size=len(tokenizer), n_positions=MAX_POSITIONS, bos_token_id=eos, eos_token_id=eos,
                      pad_token_id=tokenizer.pad_token_id, **values)


def build_tiny_models(
    out_dir: str,
    *,
    task: str,
    label_names: list[str],
    vocab: list[str],
    teacher: dict | None = None,
    student: dict | None = None,
    seed: int = 0,
) -> tuple[str, str]:
    """Write ``out_dir/teacher`` and ``out_dir/student``; return their paths.

    Each folder holds the same word-level tokenizer (:func:`build_word_tokenizer`) and a randomly
    initialised ``BertFor{Sequence,Token}Classification`` (safetensors) with ``id2label`` /
    ``label2id`` from ``label_names``; for ``task="causal_lm"`` a ``GPT2LMHeadModel`` instead
    (``label_names`` unused; [SEP] is its eos, [PAD] its pad token). ``teacher`` / ``student``
    override BertConfig (GPT2Config) fields of the defaults (teacher: 4 layers, H=128, 4 heads;
    student: 2 layers, H=64, 2 heads; GPT-2: 2 layers × 64 and 1 layer × 32, 2 heads). Weights
    are seeded from ``seed`` (teacher) and ``seed + 1`` (student): same seed, same files.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    auto = {
        "sequence_classification": AutoModelForSequenceClassification,
        "token_classification": AutoModelForTokenClassification,
        "causal_lm": AutoModelForCausalLM,
    }
    if task not in auto:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(auto)}")
    if task != "causal_lm" and (len(label_names) < 2 or len(set(label_names)) != len(label_names)):
        raise ValueError(f"label_names must hold at least 2 distinct names, got {label_names!r}")
    tokenizer = build_word_tokenizer(vocab)
    dirs = []
    lm = task == "causal_lm"
    for offset, (role, shape, defaults) in enumerate(
        (("teacher", teacher, LM_TEACHER_DEFAULTS if lm else TEACHER_DEFAULTS),
         ("student", student, LM_STUDENT_DEFAULTS if lm else STUDENT_DEFAULTS))
    ):
        config = (_gpt2_config(shape, defaults, role, tokenizer) if lm
                  else _bert_config(shape, defaults, role, len(tokenizer), list(label_names)))
        with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
            torch.manual_seed(seed + offset)
            model = auto[task].from_config(config)
        path = os.path.join(out_dir, role)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return dirs[0], dirs[1]
