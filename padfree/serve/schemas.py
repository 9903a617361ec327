"""Request and response bodies of the routes, in the shapes clients already speak: OpenAI (``/v1/embeddings``),
text-embeddings-inference (``/embed``, ``/embed_all``, ``/rerank``, ``/predict``, ``/tokenize``, ``/info``)
and Cohere/Jina (``/v1/rerank``). Unknown fields are ignored, as those servers do; ``model`` picks one of the
served models (TEI routes: a padfree extension; default the first ``--model``)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Direction = Literal["right", "left", "Right", "Left"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="which served model (default: the first --model)")


# ---------------------------------------------------------------- OpenAI
_TASK = ("the task adapter to run, for a model with task LoRA adapters (jina-embeddings-v3: retrieval.query, "
         "retrieval.passage, separation, classification, text-matching; as Jina's own API names it); default: the "
         "one the server loaded. It does not add the task's prompt: give prompt_name for that")


class OpenAIEmbeddingRequest(_Body):
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, a list of texts, or token ids of the model's vocabulary (one list, or a list of lists)")
    encoding_format: Literal["float", "base64", "int8", "uint8", "binary", "ubinary"] = Field(
        "float", description="float or base64 (float32 bytes, little-endian), as OpenAI; or quantized (a padfree "
                             "extension): int8 / uint8 (255 steps between each vector's min and max), binary / "
                             "ubinary (sign bits packed 8 to a byte), as sentence-transformers' quantize_embeddings")
    dimensions: int | None = Field(None, ge=1, description="keep the first N dimensions, then re-normalize")
    user: str | None = None
    task: str | None = Field(None, description=_TASK)


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "padfree"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


# ---------------------------------------------------------------- text-embeddings-inference
class _Truncation(_Body):
    truncate: bool | None = Field(None, description="cut inputs longer than the model's limit "
                                                    "(default: the server's --auto-truncate)")
    truncation_direction: Direction = "right"


class EmbedAllRequest(_Truncation):
    inputs: str | list[str]
    prompt_name: str | None = None
    task: str | None = Field(None, description=_TASK)


class EmbedRequest(EmbedAllRequest):
    normalize: bool = True
    dimensions: int | None = Field(None, ge=1, description="keep the first N dimensions (then normalize)")
    # late chunking (a padfree extension): the answer is then one ChunkedEmbeddings per input
    chunks: list[list[tuple[int, int]]] | None = Field(
        None, description="late chunking: one list of character spans [start, end) per input (end excluded). Each "
                          "input is encoded whole, and each span is pooled over the tokens that have a character in "
                          "it, so every chunk's vector has seen the whole input. The answer is one "
                          "ChunkedEmbeddings per input instead of one vector")
    chunk_tokens: int | None = Field(
        None, ge=1, description="late chunking into consecutive windows of this many tokens of each input (special "
                                "tokens excluded); the answer gives each window's character span. Give chunks or "
                                "chunk_tokens, not both")


class ChunkedEmbeddings(BaseModel):
    """One input's late chunking on /embed: a vector per chunk and the character span each covers."""
    embeddings: list[list[float]]
    spans: list[tuple[int, int]]


class RerankRequest(_Truncation):
    query: str
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False


class Rank(BaseModel):
    index: int
    score: float
    text: str | None = None


class PredictRequest(_Truncation):
    inputs: str | list[str] | list[list[str]] = Field(
        description='a text, a pair ["text", "text pair"], or a list of texts or pairs (as TEI: a list of exactly '
                    'two strings is one pair)')
    raw_scores: bool = False


class Prediction(BaseModel):
    score: float
    label: str


class TokenizeRequest(_Body):
    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class EmbedSparseRequest(_Truncation):
    """TEI's ``/embed_sparse``: SPLADE vectors as ``[[{"index", "value"}, ...], ...]``, one list per input."""
    inputs: str | list[str]
    prompt_name: str | None = None


class SparseValue(BaseModel):
    index: int = Field(description="the vocabulary entry")
    value: float


class TEIError(BaseModel):
    error: str
    error_type: str


# ---------------------------------------------------------------- Cohere / Jina
class CohereDocument(BaseModel):
    text: str


class CohereRerankRequest(_Body):
    query: str
    documents: list[str | CohereDocument]
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    truncate: bool | None = None


class CohereResult(BaseModel):
    index: int
    relevance_score: float
    document: CohereDocument | None = None


class CohereUsage(BaseModel):
    total_tokens: int


class CohereRerankResponse(BaseModel):
    id: str
    model: str
    results: list[CohereResult]
    usage: CohereUsage


# ---------------------------------------------------------------- Cohere v2 (cohere.ClientV2)
EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereEmbedRequest(_Body):
    """Cohere's ``POST /v2/embed``. ``input_type`` picks the model's prompt of that name, or of its usual
    sentence-transformers name (search_query: query; search_document: document or passage), where the model
    has one; ``truncate`` NONE refuses a text past the model's limit (413), START / END cut it on that side."""
    texts: list[str]
    input_type: str | None = Field(None, description="search_query, search_document, classification, clustering")
    embedding_types: list[EmbeddingType] = Field(
        ["float"], min_length=1, description="int8 / uint8: 255 steps between each vector's min and max; binary "
                                             "/ ubinary: sign bits packed 8 to a byte (as sentence-transformers' "
                                             "quantize_embeddings); base64: the float32 bytes, little-endian")
    truncate: Literal["NONE", "START", "END"] = "END"
    output_dimension: int | None = Field(None, ge=1, description="keep the first N dimensions (then normalize)")
    max_tokens: int | None = Field(None, ge=1, description="cut each text to at most this many tokens")


class CohereV2RerankRequest(_Body):
    """Cohere's ``POST /v2/rerank``: documents are plain strings."""
    query: str
    documents: list[str]
    top_n: int | None = Field(None, ge=1)
    max_tokens_per_doc: int | None = Field(None, ge=1, description="cut each document to this many tokens")


class CohereV2Result(BaseModel):
    index: int
    relevance_score: float


class CohereMeta(BaseModel):
    api_version: dict = {"version": "2"}
    billed_units: dict


class CohereV2RerankResponse(BaseModel):
    id: str
    results: list[CohereV2Result]
    meta: CohereMeta


class CohereEmbedResponse(BaseModel):
    id: str
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"
    embeddings: dict[str, list[list[float]] | list[list[int]] | list[str]]
    texts: list[str]
    meta: CohereMeta


class ClassificationParameters(BaseModel):
    """``parameters`` of a classification body on TEI's ``POST /`` (huggingface_hub's ``text_classification``)."""
    model_config = ConfigDict(extra="ignore")
    function_to_apply: Literal["sigmoid", "softmax", "none"] | None = None
    top_k: int | None = Field(None, ge=1)
