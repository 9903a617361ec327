"""The embedding server a user would write: sentence-transformers' ``encode`` behind FastAPI, OpenAI's route.

    python -m padfree.bench.st_server --model PATH --port 8001 [--name NAME] [--host 127.0.0.1]

``POST /v1/embeddings`` takes OpenAI's body (``input``: a string or a list of strings, ``model``,
``encoding_format``: ``float`` or ``base64``, the latter little-endian float32 as OpenAI sends) and answers
OpenAI's shape; ``GET /health`` answers 200 once the model is loaded. The route is a plain ``def``, so FastAPI
runs ``model.encode`` in its thread pool, as a user would write it; no batching across requests.
"""
from __future__ import annotations

import argparse
import base64
import os
from typing import Literal

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel


class EmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"


def create_app(model_path: str, name: str | None = None, device: str = "cpu") -> FastAPI:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device=device)
    served = name or os.path.basename(os.path.normpath(model_path))
    app = FastAPI(title="sentence-transformers server")

    @app.get("/health")
    def health():
        return {"status": "ok", "model": served}

    @app.post("/v1/embeddings")
    def embeddings(req: EmbeddingRequest):
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise HTTPException(status_code=400, detail="input is empty")
        vecs = model.encode(texts, convert_to_numpy=True).astype("<f4", copy=False)
        if req.encoding_format == "base64":
            data = [base64.b64encode(v.tobytes()).decode("ascii") for v in vecs]
        else:
            data = vecs.tolist()
        # usage is left at 0: counting tokens would tokenize every text a second time
        return {"object": "list", "model": served,
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                "usage": {"prompt_tokens": 0, "total_tokens": 0}}

    return app


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m padfree.bench.st_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a sentence-transformers directory")
    p.add_argument("--name", help="the model name to answer with (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    import uvicorn
    uvicorn.run(create_app(args.model, args.name), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
