"""padfree: padding-free inference for BERT-family encoders on variable-length batches."""
from .batch import PackedBatch
from .config import ModelConfig
from .engine import AsyncEngine
from .heads import CrossEncoder, SequenceClassifier, TokenClassifier, words_from_tokens
from .loading import from_pretrained
from .models.encoder import Encoder
from .outputs import EncoderOutput, SequenceClassifierOutput, TokenClassifierOutput
from .pooling import pool
from .sentence import Chunked, SentenceEncoder
from .sparse import SparseEncoder

__all__ = ["PackedBatch", "ModelConfig", "AsyncEngine", "Encoder", "EncoderOutput", "SentenceEncoder", "Chunked", "SparseEncoder",
           "from_pretrained", "pool",
           "SequenceClassifier", "TokenClassifier", "CrossEncoder", "words_from_tokens",
           "SequenceClassifierOutput", "TokenClassifierOutput"]
__version__ = "0.1.0"
