"""Persistence of quantized models: the packed format (``format``), reading and checking files (``reading``), the
module surgery of loading (``loading``) and saving (``saving``)."""

from ..digest import content_digest
from .format import checkpoint_sizes, packed_state_dict
from .loading import finish_packed_loading, load_quantized, prepare_packed_loading
from .reading import canonical_tensors, read_checkpoint
from .saving import save_quantized

__all__ = ["canonical_tensors", "checkpoint_sizes", "content_digest", "finish_packed_loading", "load_quantized",
           "packed_state_dict", "prepare_packed_loading", "read_checkpoint", "save_quantized"]
