"""sentence-transformers modules after Pooling (Dense, LayerNorm, Normalize anywhere), ``truncate_dim``, and quantized
embeddings, against the real sentence-transformers (the oracle).

The directories are small random-weight BERTs with MiniLM's tokenizer, saved by sentence-transformers itself with
the chains under test (built once per module); each is compared with ``SentenceTransformer(dir).encode`` in fp32.
Quantization is compared bit for bit with ``sentence_transformers.quantize_embeddings`` on the same float vectors,
and the job (``padfree embed --precision``, through ``run_job`` in-process) with the library.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from serving import embedder_dir

import padfree
from padfree.jobs.runner import JobSpec, run_job
from padfree.quantize import PRECISIONS, quantize

st = pytest.importorskip("sentence_transformers")
from sentence_transformers.sentence_transformer.modules import (  # noqa: E402
    Dense, LayerNorm, Normalize, Pooling, Transformer)

TEXTS = ["hi", "OK", "Hello, world!", "naïve café déjà vu", "x = 1 + 2",
         "The quick brown fox jumps over the lazy dog near the river bank, twice.",
         "A much longer text that goes on for a while so that it has many tokens: " * 6,
         "emoji 🙂 here", "    leading and trailing spaces   ", "one more, of middling length, for the batch"]
CALIBRATION = ["calibration text number %d, with some words" % i for i in range(12)] + TEXTS[:3]


def _chains():
    """name -> (modules after the Transformer, truncate_dim), weights seeded."""
    torch.manual_seed(1)
    ln = LayerNorm(32)
    with torch.no_grad():
        ln.norm.weight.uniform_(0.5, 1.5)
        ln.norm.bias.uniform_(-0.2, 0.2)
    return {
        "tanh": ([Pooling(64, "mean"), Dense(64, 48, activation_function=torch.nn.Tanh()), Normalize()], None),
        "two_dense": ([Pooling(64, "mean"), Dense(64, 64, bias=True, activation_function=torch.nn.Identity()),
                       Dense(64, 36, bias=False), Normalize()], None),
        "mid_normalize": ([Pooling(64, ["mean", "max"]), Dense(128, 40, activation_function=torch.nn.Identity()),
                           Normalize(), Dense(40, 24, activation_function=torch.nn.GELU())], None),
        "layernorm": ([Pooling(64, "cls"), Dense(64, 32, activation_function=torch.nn.SiLU(), use_residual=True),
                       ln], None),
        "truncate": ([Pooling(64, "mean"), Dense(64, 48, activation_function=torch.nn.Tanh())], 20),
        "truncate_normalized": ([Pooling(64, "mean"), Dense(64, 48), Normalize()], 16),
    }


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("st_modules")
    base = embedder_dir(root / "base", seed=5)
    out = {}
    for name, (modules, truncate_dim) in _chains().items():
        model = st.SentenceTransformer(modules=[Transformer(str(base), max_seq_length=128), *modules],
                                       truncate_dim=truncate_dim, device="cpu")
        model.save(str(root / name))
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def models(dirs):
    """name -> (padfree SentenceEncoder, sentence-transformers model), both from the saved directory."""
    return {name: (padfree.SentenceEncoder.from_pretrained(d), st.SentenceTransformer(str(d), device="cpu"))
            for name, d in dirs.items()}


@pytest.mark.parametrize("name", ["tanh", "two_dense", "mid_normalize", "layernorm", "truncate"])
def test_chain_matches_sentence_transformers(models, name):
    enc, ref = models[name]
    got, want = enc.encode(TEXTS), ref.encode(TEXTS, convert_to_numpy=True)
    assert got.shape == want.shape == (len(TEXTS), ref.get_embedding_dimension())
    assert enc.dimension == ref.get_embedding_dimension()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    single = enc.encode(TEXTS[6])  # alone in its batch: the same vector
    np.testing.assert_allclose(single, want[6], atol=1e-5, rtol=0)


def test_final_normalize_is_the_default_flag(models):
    enc, ref = models["tanh"]
    assert enc.normalize_embeddings and not models["mid_normalize"][0].normalize_embeddings
    assert len(enc.pipeline.steps) == 1 and len(models["mid_normalize"][0].pipeline.steps) == 3
    raw = enc.encode(TEXTS, normalize_embeddings=False)  # the final Normalize turned off; the Dense still runs
    with torch.no_grad():
        want = np.concatenate([ref[2]({"sentence_embedding": torch.as_tensor(_pooled(ref, t))})["sentence_embedding"]
                               .numpy() for t in TEXTS])
    np.testing.assert_allclose(raw, want, atol=1e-5, rtol=0)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1)


def _pooled(ref, text: str) -> np.ndarray:
    """sentence-transformers' pooled vector of ``text`` (Transformer -> Pooling only) ``[1, H]``."""
    features = ref.preprocess([text])
    with torch.no_grad():
        return ref[1](ref[0](features))["sentence_embedding"].numpy()


def test_truncate_dim(models):
    enc, ref = models["truncate"]
    assert enc.truncate_dim == 20 and enc.dimension == 20 and enc.pipeline.dimension == 48
    full = enc.encode(TEXTS, truncate_dim=48)  # a call's cut wins, up to the model's dimension
    np.testing.assert_allclose(full, ref.encode(TEXTS, truncate_dim=48), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="more than the model's 48"):
        enc.encode(TEXTS, truncate_dim=49)
    # with a final Normalize: padfree cuts, then normalizes (sentence-transformers does so with
    # normalize_embeddings=True; without, it cuts the unit vector)
    enc, ref = models["truncate_normalized"]
    got = enc.encode(TEXTS)
    assert got.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(got, ref.encode(TEXTS, normalize_embeddings=True), atol=1e-5, rtol=0)


def test_late_chunking_goes_through_the_chain(models):
    enc, ref = models["two_dense"]
    doc = TEXTS[6]
    got = enc.encode_chunks([doc], chunk_tokens=5)[0].embeddings
    ids, layouts = enc.chunk_layouts([doc], chunk_tokens=5)
    hidden = enc.encoder.forward_packed(padfree.PackedBatch.from_sequences(ids))
    pooled = enc.pooled_chunks(hidden, padfree.PackedBatch.from_sequences(ids), layouts)[0]
    with torch.no_grad():
        want = ref[4](ref[3](ref[2]({"sentence_embedding": pooled.float()})))["sentence_embedding"]
    assert got.shape == (len(layouts[0].tokens), 36)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)


def _garbage_weights(folder):
    (folder / "model.safetensors").write_bytes(b"not a safetensors file at all" * 10)


@pytest.mark.parametrize("kind", ["sentence_transformers.models.WordEmbeddings", "my_package.models.Funky"])
def test_unknown_module_refused_before_weights(dirs, tmp_path, kind):
    d = shutil.copytree(dirs["tanh"], tmp_path / "m")
    modules = json.loads((d / "modules.json").read_text())
    modules.insert(2, {"idx": 9, "name": "9", "path": "9_Funky", "type": kind})
    (d / "modules.json").write_text(json.dumps(modules))
    (d / "9_Funky").mkdir()
    _garbage_weights(d / "9_Funky")
    _garbage_weights(d)  # the transformer's weights too: nothing may be read before the refusal
    with pytest.raises(ValueError, match=kind.rsplit(".", 1)[-1]):
        padfree.SentenceEncoder.from_pretrained(d)


def test_dense_activation_outside_allow_list(dirs, tmp_path):
    d = shutil.copytree(dirs["tanh"], tmp_path / "m")
    conf = json.loads((d / "2_Dense" / "config.json").read_text())
    conf["activation_function"] = "os.system"
    (d / "2_Dense" / "config.json").write_text(json.dumps(conf))
    _garbage_weights(d / "2_Dense")
    _garbage_weights(d)
    with pytest.raises(ValueError, match="'os.system'.*Identity, Tanh"):
        padfree.SentenceEncoder.from_pretrained(d)


def test_dense_width_mismatch(dirs, tmp_path):
    d = shutil.copytree(dirs["tanh"], tmp_path / "m")
    conf = json.loads((d / "2_Dense" / "config.json").read_text())
    conf["in_features"] = 65
    (d / "2_Dense" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="in_features=65.*64 wide"):
        padfree.SentenceEncoder.from_pretrained(d)


# ------------------------------------------------------------------------------------------------ quantization

@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantized_with_calibration_matches(models, precision):
    enc, _ = models["two_dense"]
    floats = enc.encode(TEXTS)
    calibration = enc.encode(CALIBRATION)
    got = enc.encode(TEXTS, precision=precision, calibration_embeddings=calibration)
    want = st.quantize_embeddings(floats, precision, calibration_embeddings=calibration)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.shape == (len(TEXTS), 5 if precision.endswith("binary") else 36)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("precision", ["int8", "uint8"])
def test_quantized_per_vector_by_default(models, precision):
    enc, _ = models["mid_normalize"]
    floats = enc.encode(TEXTS)
    got = enc.encode(TEXTS, precision=precision)
    assert got.dtype == np.dtype(precision) and got.shape == floats.shape
    for g, f in zip(got, floats):
        ranges = np.vstack([np.full_like(f, f.min()), np.full_like(f, f.max())])
        np.testing.assert_array_equal(g, st.quantize_embeddings(f[None], precision, ranges=ranges)[0])
    # a vector's bits depend on its own floats only, not on the vectors quantized beside it
    np.testing.assert_array_equal(np.concatenate([quantize(f[None], precision) for f in floats]),
                                  quantize(floats, precision))


def test_quantized_after_the_cut(models):
    enc, _ = models["truncate"]  # truncate_dim=20: ranges and bits are of the cut vector
    floats = enc.encode(TEXTS)
    calibration = enc.encode(CALIBRATION)
    got = enc.encode(TEXTS, precision="uint8", calibration_embeddings=calibration)
    np.testing.assert_array_equal(got, st.quantize_embeddings(floats, "uint8", calibration_embeddings=calibration))
    assert enc.encode(TEXTS, precision="binary").shape == (len(TEXTS), 3)
    assert enc.encode([], precision="ubinary").shape == (0, 3)
    with pytest.raises(ValueError, match=r"\[2, 20\]"):
        enc.encode(TEXTS, precision="int8", calibration_embeddings=enc.encode(CALIBRATION, truncate_dim=48))


def test_bad_precision(models):
    enc, _ = models["tanh"]
    with pytest.raises(ValueError, match="float32, int8, uint8, binary, ubinary; got 'int4'"):
        enc.encode(TEXTS, precision="int4")
    with pytest.raises(ValueError, match="float32, int8, uint8, binary, ubinary"):
        enc.pipeline.output_options(precision="fp16")
    with pytest.raises(ValueError, match=r"\[2, 48\]"):
        enc.pipeline.output_options(precision="int8", ranges=np.zeros((2, 47)))


def test_quantize_function_on_tensors():
    x = torch.randn(3, 17)
    assert quantize(x, "binary").shape == (3, 3) and quantize(x, "ubinary").dtype == np.uint8
    np.testing.assert_array_equal(quantize(x, "binary"), st.quantize_embeddings(x.numpy(), "binary"))


# ------------------------------------------------------------------------------------------------ the job

def test_job_precision(models, dirs, tmp_path):
    enc, _ = models["two_dense"]
    texts = TEXTS * 3
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": texts}), src)

    def job(precision: str, out: str):
        run_job(JobSpec(kind="embed", input=str(src), output=str(tmp_path / out), model=str(dirs["two_dense"]),
                        dtype="fp32", shard_rows=7, progress=False, precision=precision))
        return pq.read_table(tmp_path / out)

    floats = np.stack(job("float32", "f32").column("embedding").to_numpy(zero_copy_only=False))
    int8 = job("int8", "int8").column("embedding")
    assert int8.type == pa.list_(pa.int8(), 36)
    int8 = np.stack(int8.to_numpy(zero_copy_only=False))
    ranges = [np.vstack([np.full_like(f, f.min()), np.full_like(f, f.max())]) for f in floats]
    np.testing.assert_array_equal(int8, np.stack([st.quantize_embeddings(f[None], "int8", ranges=r)[0]
                                                  for f, r in zip(floats, ranges)]))
    library = enc.encode(texts, precision="int8")  # other batches: equal but for a step where a float sits on an edge
    assert np.abs(int8.astype(int) - library.astype(int)).max() <= 1 and (int8 == library).mean() > 0.99
    ubinary = job("ubinary", "ub").column("embedding")
    assert ubinary.type == pa.list_(pa.uint8(), 5)
    np.testing.assert_array_equal(np.stack(ubinary.to_numpy(zero_copy_only=False)),
                                  st.quantize_embeddings(floats, "ubinary"))
    np.testing.assert_array_equal(np.stack(ubinary.to_numpy(zero_copy_only=False)),
                                  enc.encode(texts, precision="ubinary"))
    manifest = json.loads((tmp_path / "int8" / "_manifest.json").read_text())
    assert manifest["options"]["precision"] == "int8"
    assert "precision" not in json.loads((tmp_path / "f32" / "_manifest.json").read_text())["options"]
    with pytest.raises(ValueError, match="--precision: 'int8' before, 'uint8' now"):
        job("uint8", "int8")
    with pytest.raises(ValueError, match="float32, int8, uint8, binary, ubinary"):
        job("int4", "bad")
