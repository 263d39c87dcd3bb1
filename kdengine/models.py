"""Loading teachers and students, DistilBERT-style student initialisation, compatibility checks.

Models are transformers ``AutoModelFor{Sequence,Token}Classification`` / ``AutoModelForCausalLM`` loaded from local
directories or hub names. Offline, a hub name that is not in the local cache fails with a clear
message instead of a network traceback.
"""

from __future__ import annotations

import copy
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers import AutoModelForTokenClassification, AutoTokenizer

from kdengine.data.readers import canonical_label

AUTO_CLASSES = {"sequence_classification": AutoModelForSequenceClassification,
                "token_classification": AutoModelForTokenClassification,
                "causal_lm": AutoModelForCausalLM}


def resolve(name_or_path: str, what: str) -> str:
    """``name_or_path`` if it is a local directory or a reachable/cached hub model (ValueError otherwise)."""
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise ValueError(f"{what} {name_or_path!r} is a directory without config.json; pass a model directory "
                             "(config.json + weights, as save_pretrained writes)")
        return name_or_path
    if os.path.exists(name_or_path):
        raise ValueError(f"{what} {name_or_path!r} is a file; pass a model directory (config.json + weights)")
    try:
        AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what}: model {name_or_path!r} not found locally and the hub is not reachable; "
                         f"pass a local directory ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return name_or_path


def label_maps(label_names: list[str]) -> dict:
    return dict(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                label2id={name: i for i, name in enumerate(label_names)})


def load_for_task(name_or_path: str, task: str, label_names: list[str], *, what: str):
    """Load a model with a task head for ``label_names``.

    Returns ``(model, head_trained)``: ``head_trained`` is True when the checkpoint already held
    the task head for the same label set (no missing head weights, same id2label), i.e. the model
    is already trained for this task and can be used as is; always True for ``causal_lm``.
    """
    path = resolve(name_or_path, what)
    if task == "causal_lm":                       # the LM head is the task head
        return AUTO_CLASSES[task].from_pretrained(path), True
    config = AutoConfig.from_pretrained(path)
    same_labels = saved_labels(config) == [canonical_label(name) for name in label_names]
    model, info = AUTO_CLASSES[task].from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True,
                                                     **label_maps(label_names))
    head_missing = bool(info.get("missing_keys")) or bool(info.get("mismatched_keys"))
    return model, same_labels and not head_missing


def saved_labels(config) -> list[str]:
    """The label names of a model config's head in id order, compared by value
    (:func:`kdengine.data.readers.canonical_label`: "1.0" is "1")."""
    id2label = getattr(config, "id2label", None) or {}
    return [canonical_label(v) for _, v in sorted((int(k), v) for k, v in id2label.items())]


def check_teacher_labels(sources: list[str]) -> None:
    """Teachers that already hold a task head must name the same labels (ValueError otherwise);
    a config with transformers' default names (LABEL_0, ...) carries no label set."""
    seen = None
    for source in sources:
        labels = saved_labels(AutoConfig.from_pretrained(resolve(source, "teacher_model_name_or_path")))
        if not labels or labels == [f"LABEL_{i}" for i in range(len(labels))]:
            continue
        if seen is not None and labels != seen[1]:
            raise ValueError(f"the teachers have different label sets: {seen[0]} has {seen[1]} and {source} has "
                             f"{labels}; multi-teacher distillation needs one label set (same names, same order)")
        seen = seen or (source, labels)


def text_positions(config) -> int | None:
    """How many token positions a model with this transformers config reads (None: not stated);
    RoBERTa-style models lose the padding index and the ones below it."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and ("roberta" in str(config.model_type) or config.model_type == "camembert"):
        positions -= (config.pad_token_id or 0) + 1          # positions start after the padding index
    return positions


def load_tokenizer(name_or_path: str, what: str):
    path = resolve(name_or_path, what)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} {name_or_path!r} has no usable tokenizer ({exc}); save one with the model") from None


def layer_list(model: torch.nn.Module, num_layers: int,
               option: str = "student_num_layers") -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList holding the transformer layers (e.g. ``bert.encoder.layer``) and its name;
    ValueError naming ``option`` (the option that needs it) when there is none."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers and name:
            return name, module
    hint = "; pass --model_name_or_path instead" if option == "student_num_layers" else ""
    raise ValueError(f"{option}: cannot find the list of {num_layers} transformer layers in "
                     f"{type(model).__name__}{hint}")


def evenly_spaced(total: int, keep: int) -> list[int]:
    """``keep`` layer indices spread over ``total`` (first and last included when keep >= 2)."""
    if not 1 <= keep <= total:
        raise ValueError(f"student_num_layers must be in [1, {total}] (the teacher has {total} layers), got {keep}")
    if keep == 1:
        return [total - 1]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def student_from_teacher(teacher: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """DistilBERT-style student: the teacher's embeddings, pooler and head, and ``num_layers`` of its
    layers (evenly spaced). Works for encoders whose config has ``num_hidden_layers``."""
    total = getattr(teacher.config, "num_hidden_layers", None)
    if total is None:
        raise ValueError(f"student_num_layers needs a config with num_hidden_layers; "
                         f"{type(teacher.config).__name__} has none")
    keep = evenly_spaced(total, num_layers)
    prefix, _ = layer_list(teacher, total)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = num_layers
    student = type(teacher)(config)
    source = teacher.state_dict()
    state = {}
    for key in student.state_dict():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1:].split(".", 1)
            state[key] = source[f"{prefix}.{keep[int(index)]}.{rest}"]
        else:
            state[key] = source[key]
    student.load_state_dict(state)
    return student


def _vocab_size(model: torch.nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[0]


def check_pair(teacher: torch.nn.Module, student: torch.nn.Module, task: str) -> None:
    """Logit distillation needs the same output space and the same input ids on both sides.

    * classification: the same number of labels (and label names);
    * language modelling (``task`` ending in ``lm``): the same output vocabulary size;
    * always: the same input vocabulary, because the batch is tokenized once.
    """
    t_cfg, s_cfg = teacher.config, student.config
    if task.endswith("lm"):
        t_out, s_out = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
        if t_out != s_out:
            raise ValueError(f"vocabulary mismatch: the teacher predicts {t_out} tokens and the student {s_out}; "
                             "logit distillation needs one vocabulary: use a student from the teacher's family "
                             "(same tokenizer), or resize the smaller model's embeddings to the larger size")
    elif t_cfg.num_labels != s_cfg.num_labels:
        raise ValueError(f"label mismatch: the teacher has {t_cfg.num_labels} labels but the student has "
                         f"{s_cfg.num_labels}; logit distillation needs the same label set")
    t_in, s_in = _vocab_size(teacher), _vocab_size(student)
    if t_in != s_in:
        raise ValueError(f"input vocabulary mismatch: the teacher embeds {t_in} token ids and the student {s_in}; "
                         "both read the same tokenized batch, so they need the same tokenizer")


def check_tokenizers(teacher_tok, student_tok) -> None:
    """The batch is tokenized once (with the student tokenizer): the teacher must share it."""
    if teacher_tok is None or student_tok is None:
        return
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise ValueError("tokenizer mismatch: the teacher and student tokenizers have different vocabularies; "
                         "both models read the same token ids, so use models with the same tokenizer")


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no gradients (a frozen teacher)."""
    model.eval()
    model.requires_grad_(False)
    return model


MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict) -> dict:
    """The model inputs of a collated batch (no labels: methods compute their own losses)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}


def save_trainable(module: torch.nn.Module, path: str) -> None:
    """The trainable parameters of ``module`` (``requires_grad``; names as ``named_parameters``)
    as one safetensors file: what a stage changes, without the frozen parts it rebuilds."""
    from safetensors.torch import save_file  # noqa: PLC0415

    state = {name: p.detach().cpu().contiguous().clone() for name, p in module.named_parameters() if p.requires_grad}
    save_file(state, path)


def read_safetensors(path: str) -> dict:
    """{name: tensor} of a safetensors file (ValueError naming it when it is missing or damaged)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing: the saved stage or checkpoint is incomplete")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise ValueError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); it is "
                         "damaged") from None


def load_trainable(module: torch.nn.Module, path: str) -> None:
    """Load what :func:`save_trainable` wrote into ``module`` (ValueError on a name it does not have)."""
    state = read_safetensors(path)
    params = dict(module.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"{path}: parameters {unknown[:5]} are not in {type(module).__name__}; the file was "
                         "saved from a different module or options")
    wrong = [f"{name} {tuple(value.shape)} (expected {tuple(params[name].shape)})" for name, value in state.items()
             if value.shape != params[name].shape]
    if wrong:
        raise ValueError(f"{path}: wrong shapes {wrong[:3]}; the file was saved from a different module or options")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device))
