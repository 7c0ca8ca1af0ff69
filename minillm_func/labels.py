"""The label convention the data and the losses share.

Labels are *already aligned*: ``labels[b, t]`` is the target of ``logits[b, t]``
(the datasets shift them once, when they build an item). A label equal to
:data:`IGNORE_INDEX` is counted by no loss: prompt tokens in SFT, padding, the
position after a sequence's last token.
"""

import torch

__all__ = ["IGNORE_INDEX", "require_integer_ids"]

IGNORE_INDEX = -100  # torch's F.cross_entropy default ignore_index


def require_integer_ids(x: torch.Tensor, who: str, what: str) -> None:
    """Raise a one-line ``ValueError`` unless ``x`` holds integer ids (not float, not bool)."""
    if x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"{who}: {what} must be integer token ids, got dtype {x.dtype}.")
