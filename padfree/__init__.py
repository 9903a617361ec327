"""padfree: padding-free inference for BERT-family encoders on variable-length batches."""
from .batch import PackedBatch
from .config import ModelConfig
from .loading import from_pretrained
from .models.encoder import Encoder, EncoderOutput
from .pooling import pool
from .sentence import SentenceEncoder

__all__ = ["PackedBatch", "ModelConfig", "Encoder", "EncoderOutput", "SentenceEncoder", "from_pretrained", "pool"]
__version__ = "0.1.0"
