"""Constants shared across kdengine, in a leaf module that imports nothing (cheap to import anywhere).

``IGNORE_INDEX``: the label of a row that contributes nothing to a loss (PyTorch's and Hugging
Face's convention, -100). Every op and reference takes it as the default ``ignore_index``.
"""

IGNORE_INDEX = -100

TASKS = ("sequence_classification", "token_classification", "causal_lm")
"""The task types: a label per sequence, a label per token, or next-token prediction on responses."""
