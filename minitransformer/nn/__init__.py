"""Neural-network modules: the paper's §3, one idea per class."""
from .attention import MultiHeadAttention
from .layers import Dropout, Embedding, LayerNorm, Linear, PositionalEncoding, PositionwiseFeedForward
from .module import Module, ModuleList, Parameter
from .transformer import (Decoder, DecoderLayer, Encoder, EncoderLayer, Transformer, TransformerConfig,
                          causal_mask, padding_mask)

__all__ = ["Module", "ModuleList", "Parameter", "Linear", "Embedding", "LayerNorm", "Dropout",
           "PositionalEncoding", "PositionwiseFeedForward", "MultiHeadAttention", "EncoderLayer",
           "DecoderLayer", "Encoder", "Decoder", "Transformer", "TransformerConfig", "padding_mask",
           "causal_mask"]
