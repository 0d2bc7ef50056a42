"""HF <-> Megatron checkpoint conversion, streamed tensor by tensor (``tools/convert_*.py``)."""

from .hf_checkpoint import HFCheckpointError
from .hf_to_megatron import ConversionReport, convert_hf_to_megatron
from .megatron_to_hf import MegatronCheckpointError, convert_megatron_to_hf

__all__ = ["ConversionReport", "HFCheckpointError", "MegatronCheckpointError", "convert_hf_to_megatron",
           "convert_megatron_to_hf"]
