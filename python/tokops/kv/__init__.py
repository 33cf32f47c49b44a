"""Quantized KV storage: KIVI group quantization (int8/int4/int2) and fp8 e4m3."""

from .quant import Fp8Tensor, QuantizedTensor, dequantize, dequantize_fp8, quantize, quantize_fp8
from .decode import QuantizedKVCache, decode_attention, decode_attention_reference  # noqa: E402
from .paged import PagedKVCache, PagePoolExhausted, paged_decode, paged_decode_attention  # noqa: E402

__all__ = ["QuantizedTensor", "Fp8Tensor", "quantize", "dequantize", "quantize_fp8", "dequantize_fp8",
           "QuantizedKVCache", "decode_attention", "decode_attention_reference",
           "PagedKVCache", "PagePoolExhausted", "paged_decode", "paged_decode_attention"]
