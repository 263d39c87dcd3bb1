"""The models of configs/prompt_kd_gsm8k.yaml, from scratch: no pretrained causal LM is available offline.

    python scripts/gsm8k_models.py [--config configs/prompt_kd_gsm8k.yaml] [--out DIR] [--vocab 8000]
        [--teacher 4x256] [--student 2x128] [--teacher-epochs 3] [-- kdengine.train flags for the teacher]

The data, columns, lengths and evaluation settings are the config's (the teacher is evaluated as the
PromptKD run evaluates its students); ``--out`` defaults to the folder of its ``model_name_or_path``.

1. A byte-level BPE tokenizer (``tokenizers``; ``--vocab`` tokens, ``<|pad|>`` and ``<|endoftext|>``
   the pad and eos) trained on the prompts and responses of the config's ``train_file``, saved as a
   transformers fast tokenizer.
2. Randomly initialised GPT-2s with that vocabulary, ``LAYERSxHIDDEN`` (heads of 64 dimensions, at
   least 2), seeds 0 and 1, positions for ``max_seq_length`` + ``prompt_length``:
   ``<out>/teacher_init`` and ``<out>/student_init``.
3. The teacher trained supervised from ``teacher_init`` (``python -m kdengine.train --method no_kd``:
   cross-entropy on the responses, ``--teacher-epochs`` epochs) into ``<out>/teacher``, unless
   ``--teacher-epochs 0``. Flags after ``--`` go to that run (e.g. ``--max_train_samples 64``).

The student is trained by the PromptKD run itself (its ``sft`` stage, then PromptKD).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

EOS, PAD = "<|endoftext|>", "<|pad|>"
# The config's settings the teacher's supervised run shares (data, lengths, evaluation).
SHARED = ("train_file", "validation_file", "text_column", "label_column", "max_seq_length", "max_train_samples",
          "max_eval_samples", "eval_generation_seeds", "per_device_train_batch_size", "per_device_eval_batch_size",
          "eval_strategy", "logging_steps", "report_to", "seed")


def _shape(text: str) -> dict:
    """``"LAYERSxHIDDEN"`` -> GPT2Config fields (heads of 64 dims, at least 2)."""
    try:
        layers, hidden = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYERSxHIDDEN (e.g. 4x256), got {text!r}") from None
    if layers < 1 or hidden < 2 or hidden % 2:
        raise argparse.ArgumentTypeError(f"LAYERSxHIDDEN needs >= 1 layer and an even hidden size, got {text!r}")
    heads = max(2, hidden // 64)
    if hidden % heads:
        raise argparse.ArgumentTypeError(f"hidden size {hidden} is not divisible by its {heads} heads")
    return {"n_layer": layers, "n_embd": hidden, "n_head": heads}


def texts(path: str, columns: tuple[str, ...]):
    """The strings of ``columns`` in each row of a JSONL file."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            yield from (row[c] for c in columns)


def train_tokenizer(train_file: str, columns: tuple[str, ...], vocab_size: int):
    """A byte-level BPE fast tokenizer trained on ``columns`` of the JSONL ``train_file`` (``vocab_size``
    tokens, pad and eos included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)   # prompt and answer each start a word
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts(train_file, columns), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, bos_token=EOS)


def build_models(out: str, tokenizer, teacher: dict, student: dict, n_positions: int) -> tuple[str, str]:
    """``out/teacher_init`` and ``out/student_init``: random GPT-2s (seeds 0, 1) with ``tokenizer``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    paths = []
    for seed, (name, shape) in enumerate((("teacher_init", teacher), ("student_init", student))):
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, bos_token_id=tokenizer.eos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
        torch.manual_seed(seed)
        path = os.path.join(out, name)
        GPT2LMHeadModel(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/prompt_kd_gsm8k.yaml")
    parser.add_argument("--out", help="default: the folder of the config's model_name_or_path")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--teacher", type=_shape, default="4x256", help="LAYERSxHIDDEN")
    parser.add_argument("--student", type=_shape, default="2x128", help="LAYERSxHIDDEN")
    parser.add_argument("--teacher-epochs", type=float, default=3.0, help="0: write the models, train nothing")
    parser.add_argument("--teacher-learning-rate", type=float, default=1e-3)
    args = parser.parse_args(argv[:len(argv) - len(extra) - (1 if "--" in argv else 0)])
    with open(args.config, encoding="utf-8") as fh:
        config = yaml.safe_load(fh)
    out = args.out or os.path.dirname(config["model_name_or_path"])
    train_file = config["train_file"]
    if not os.path.isfile(train_file):
        raise SystemExit(f"{train_file} (train_file of {args.config}) not found; run from the repository root")
    tokenizer = train_tokenizer(train_file, (config["text_column"], config["label_column"]), args.vocab)
    from kdengine.methods.prompt_kd import PromptKDOptions

    positions = config["max_seq_length"] + config.get("prompt_length", PromptKDOptions.prompt_length)
    teacher_init, student_init = build_models(out, tokenizer, args.teacher, args.student, positions)
    print(f"[gsm8k] tokenizer ({len(tokenizer)} tokens) and models in {teacher_init}, {student_init}")
    if args.teacher_epochs == 0:
        return 0
    from kdengine.train.__main__ import main as train

    flags = [f for key in SHARED if key in config for f in (f"--{key}", str(config[key]))]
    flags += ["--method", "no_kd", "--task", "causal_lm", "--model_name_or_path", teacher_init,
              "--num_train_epochs", str(args.teacher_epochs), "--learning_rate", str(args.teacher_learning_rate),
              "--save_strategy", "no", "--compare_baselines", "false", "--output_dir", os.path.join(out, "teacher")]
    return train(flags + extra)


if __name__ == "__main__":
    sys.exit(main())
