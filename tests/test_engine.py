"""``padfree.AsyncEngine``: many concurrent coroutines batched together by one scheduler, every result equal to
the library's offline one (the oracle: ``SentenceEncoder`` / ``CrossEncoder``, each checked against
sentence-transformers in their own tests), several models, errors, and a clean shutdown."""
from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

import padfree
from padfree.bench.corpus import stdlib_paragraphs
from padfree.engine import AsyncEngine, ModelNotFound

from serving import classifier_dir, minilm_path

FP32_TOL = 1e-5


def hf_probabilities(path, texts) -> np.ndarray:
    """transformers' softmax over the classifier's logits (the oracle)."""
    import torch
    import transformers as t
    model = t.AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    tok = t.AutoTokenizer.from_pretrained(str(path))
    with torch.no_grad():
        return model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1).numpy()


@pytest.fixture(scope="module")
def offline():
    return padfree.SentenceEncoder.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def texts() -> list[str]:
    paragraphs = stdlib_paragraphs(limit=120)
    rng = random.Random(1)
    return [" ".join(p.split()[:rng.randint(1, 40)]) for p in paragraphs]


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    path = classifier_dir(tmp_path_factory.mktemp("rerank") / "m", 1, seed=1)
    return path, padfree.CrossEncoder.from_pretrained(path)


def test_concurrent_callers_are_batched_together_and_get_their_own_rows(offline, texts, reranker):
    """64 coroutines at once with different options and two models: each gets exactly its rows (equal to the
    offline encode with the same options), and the forwards carried several callers each."""
    path, cross = reranker
    batches = []

    async def main():
        async with AsyncEngine(max_batch_tokens=2048, on_batch=batches.append) as engine:
            await engine.load("minilm", minilm_path())
            await engine.load("rerank", path)
            calls = []
            for i in range(48):
                chunk = texts[i * 2:i * 2 + 1 + i % 5]
                options = [{}, {"normalize": False}, {"dimensions": 64}][i % 3]
                calls.append(("embed", chunk, options, engine.embed(chunk, **options)))
            for i in range(16):
                docs = texts[i:i + 4]
                calls.append(("rerank", (texts[100 + i], docs), {}, engine.rerank(texts[100 + i], docs,
                                                                                   model="rerank")))
            results = await asyncio.gather(*(c[3] for c in calls))
            return calls, results

    calls, results = asyncio.run(main())
    for (kind, inputs, options, _), got in zip(calls, results):
        if kind == "embed":
            want = offline.encode(inputs, normalize_embeddings=options.get("normalize"))
            if "dimensions" in options:
                want = want[:, :options["dimensions"]]
                want = want / np.linalg.norm(want, axis=1, keepdims=True)
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= FP32_TOL
        else:
            query, docs = inputs
            want = cross.score([(query, d) for d in docs])
            assert got.shape == (len(docs),) and np.abs(got - want).max() <= FP32_TOL
    embed_batches = [b for b in batches if b.queue == "minilm" and b.error is None]
    assert sum(b.sequences for b in embed_batches) >= sum(len(c[1]) for c in calls if c[0] == "embed")
    assert len(embed_batches) < 48  # 48 embed calls went through fewer forwards: callers shared batches


def test_one_string_and_classify(offline, tmp_path):
    clf = classifier_dir(tmp_path / "clf", 3, seed=2)

    async def main():
        async with AsyncEngine() as engine:
            await engine.load("minilm", minilm_path())
            await engine.load("clf", clf)
            one = await engine.embed("a single text")
            probs = await engine.classify(["good", "bad movie"], model="clf")
            single = await engine.classify("good", model="clf")
            return one, probs, single

    one, probs, single = asyncio.run(main())
    assert one.shape == (offline.dimension,) and np.abs(one - offline.encode("a single text")).max() <= FP32_TOL
    want = hf_probabilities(clf, ["good", "bad movie"])
    assert probs.shape == (2, 3) and np.abs(probs - want).max() <= FP32_TOL
    assert np.abs(single - want[0]).max() <= FP32_TOL


def test_errors_name_the_problem():
    async def main():
        engine = AsyncEngine()
        await engine.load("minilm", minilm_path())
        with pytest.raises(ModelNotFound, match=r"'nope' is not served; served models: \['minilm'\]"):
            await engine.embed(["x"], model="nope")
        with pytest.raises(ValueError, match="cannot do reranking: it serves embeddings"):
            await engine.rerank("q", ["d"])
        with pytest.raises(ValueError, match="text 1 is not a string"):
            await engine.embed(["x", 3])
        with pytest.raises(ValueError, match="model names must be unique"):
            await engine.load("minilm", minilm_path(), warm=False)
        with pytest.raises(ValueError, match="dimensions=9999 is more than the model's 384"):
            await engine.embed(["x"], dimensions=9999)
        await engine.close()
        with pytest.raises(RuntimeError, match="the engine is closed"):
            await engine.embed(["x"])

    asyncio.run(main())


def test_close_lets_queued_requests_finish(offline, texts):
    """Calls running when close() is called (tokenizing or queued) are all answered (a drain), none is lost."""
    async def main():
        engine = AsyncEngine(max_batch_tokens=512)
        await engine.load("minilm", minilm_path(), warm=False)
        tasks = [asyncio.ensure_future(engine.embed(texts[i:i + 3])) for i in range(0, 60, 3)]
        await asyncio.sleep(0)  # every call has started
        await engine.close()
        return await asyncio.gather(*tasks)

    for i, got in zip(range(0, 60, 3), asyncio.run(main())):
        assert np.abs(got - offline.encode(texts[i:i + 3])).max() <= FP32_TOL
