"""Your own images and labels as training shards (``nxtp shards``): ``sources`` lists what a folder, table or COCO
file holds, ``writing`` writes it as resumable WebDataset shards with a validation split and a summary."""

from .sources import FORMS, Item, Reject, read_source
from .writing import ConversionError, convert, format_summary, shard_patterns, split_of

__all__ = [
    "FORMS",
    "ConversionError",
    "Item",
    "Reject",
    "convert",
    "format_summary",
    "read_source",
    "shard_patterns",
    "split_of",
]
