"""The label convention the data and the losses share.

Labels are *already aligned*: ``labels[b, t]`` is the target of ``logits[b, t]``
(the datasets shift them once, when they build an item). A label equal to
:data:`IGNORE_INDEX` is counted by no loss: prompt tokens in SFT, padding, the
position after a sequence's last token.
"""

__all__ = ["IGNORE_INDEX"]

IGNORE_INDEX = -100  # torch's F.cross_entropy default ignore_index
