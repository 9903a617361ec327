"""jina-embeddings-v3 against transformers' ``jina_embeddings_v3`` (random weights), with its task LoRA adapters.

The model is XLM-RoBERTa's post-LN layer with rotary Q/K (whole head, half-split, base ``rope_theta``) and no
position table. transformers' model has no adapters; the oracle here attaches them the way jinaai's remote code
computes them, per token and unmerged: forward hooks add ``scale * (x A[t]^T) B[t]^T`` to every adapted linear's
output and ``scale * A[t][ids] B[t]`` to each embedding's (scale = lora_alpha / lora_rank). padfree merges the
task into the weights at load, so agreement checks the merge (which weights, which factor order, the scale).
The factors are random and far from zero (jinaai initialises B at zero), so a wrong merge cannot hide.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers as t

import padfree

from family_zoo import (FAMILIES, VOCAB, batch, build_family, check_hidden_bf16, check_hidden_fp32, config_dir,
                        max_diff)

FP32_TOL = 1e-4
LENGTHS = FAMILIES["jina_embeddings_v3"].lengths
TASKS = ["retrieval.query", "retrieval.passage", "separation", "classification", "text-matching"]
SHAPES = FAMILIES["jina_embeddings_v3"].shapes  # with their adapters' rank and alpha
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.fc1", "mlp.fc2")


def _add_adapters(base, cfg, g, std=0.3):
    """Random factors in jinaai's layout on every adapted module, and the hooks that apply them per token."""
    scale = cfg.lora_alpha / cfg.lora_rank
    n, r = len(cfg.lora_adaptations), cfg.lora_rank
    modules = [base.embeddings.word_embeddings, base.embeddings.token_type_embeddings]
    modules += [layer.get_submodule(m) for layer in base.layers for m in LINEARS]
    if base.pooler is not None:
        modules.append(base.pooler.dense)
    for m in modules:
        if isinstance(m, torch.nn.Embedding):
            a, b = torch.randn(n, m.num_embeddings, r, generator=g), torch.randn(n, r, m.embedding_dim, generator=g)
        else:
            a, b = torch.randn(n, r, m.in_features, generator=g), torch.randn(n, m.out_features, r, generator=g)
        m.lora_A, m.lora_B = torch.nn.Parameter(a * std), torch.nn.Parameter(b * std)
        m.lora_scale, m.current_task = scale, None  # set by hf_run; module attributes follow a deepcopy
        m.register_forward_hook(_lora_hook)


def _lora_hook(mod, args, out):
    if mod.current_task is None:
        return out
    i = TASKS.index(mod.current_task)
    if isinstance(mod, torch.nn.Embedding):
        return out + mod.lora_scale * F.embedding(args[0], mod.lora_A[i]) @ mod.lora_B[i]
    return out + mod.lora_scale * (args[0] @ mod.lora_A[i].T) @ mod.lora_B[i].T


def make(shape: int, kind: str = "base", seed: int = 0, attn: str = "sdpa", adapters: bool = True, **extra):
    """family_zoo's random-weight jina-v3 (FAMILIES["jina_embeddings_v3"]), with random task adapters."""
    model, g = build_family("jina_embeddings_v3", shape, kind, seed, attn,
                            **extra, **({"lora_adaptations": TASKS} if adapters else {}))
    if adapters:
        _add_adapters(model if kind == "base" else model.roberta, model.config, g)
    return model.eval()


def hf_run(model, ids, mask, kw, task=None):
    adapted = [m for m in model.modules() if hasattr(m, "lora_scale")]
    assert adapted or task is None
    for m in adapted:
        m.current_task = task
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, **kw)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state
    finally:
        for m in adapted:
            m.current_task = None


# ---------------------------------------------------------------------------------------------- model parity
@pytest.mark.parametrize("task", [None, "retrieval.query", "text-matching"])
@pytest.mark.parametrize("shape", [0, 1])
def test_hidden_state_parity_fp32(shape, task):
    model = make(shape)
    enc = padfree.from_pretrained(model, task=task)
    assert enc.task == task and enc.config.rotary_theta == (20000.0 if shape == 0 else 500.0)
    # family_zoo's parity: both paddings, zeros at pads, HF's position_ids and its numbering from column 0
    used = check_hidden_fp32(model, LENGTHS, FP32_TOL, enc, lambda ids, mask, kw: hf_run(model, ids, mask, kw, task),
                             rotary=True)
    for ids, mask, types, kw, ref in used:
        if task is not None:  # the adapter changes the output: a merge that dropped it would fail
            assert max_diff(hf_run(model, ids, mask, kw), ref, mask) > 0.05


def test_eager_attention_and_both_padding_sides_per_task():
    model = make(1, attn="eager")
    for task in TASKS:
        enc = padfree.from_pretrained(model, task=task)
        ids, mask, types, kw = batch(model, LENGTHS, "left")
        assert max_diff(enc(ids, mask, types).last_hidden_state, hf_run(model, ids, mask, kw, task),
                        mask) <= FP32_TOL, task


@pytest.mark.parametrize("task", [None, "classification"])
@pytest.mark.parametrize("shape", [0, 1])
def test_hidden_state_parity_bf16(shape, task):
    model = make(shape)
    enc = padfree.from_pretrained(model, dtype=torch.bfloat16, task=task)
    check_hidden_bf16(model, LENGTHS, enc=enc, run=lambda m, ids, mask, kw: hf_run(m, ids, mask, kw, task))


def test_task_per_call_merges_once_and_shares_the_rest():
    model = make(1)
    enc = padfree.from_pretrained(model, task="retrieval.query")
    ids, mask, types, kw = batch(model, LENGTHS, "right")
    for task in ("retrieval.passage", "separation", "retrieval.query"):
        out = enc(ids, mask, types, task=task).last_hidden_state  # HF-style call
        assert max_diff(out, hf_run(model, ids, mask, kw, task), mask) <= FP32_TOL, task
    base = enc.for_task(None)  # the base weights stay reachable
    assert max_diff(base(ids, mask, types).last_hidden_state, hf_run(model, ids, mask, kw), mask) <= FP32_TOL
    passage = enc.for_task("retrieval.passage")
    assert passage is enc.for_task("retrieval.passage") and enc.for_task("retrieval.query") is enc  # built once
    assert passage.for_task("retrieval.query") is enc and base.for_task("retrieval.passage") is passage
    # weights without an adapter are shared, adapted ones are the task's own
    assert passage.layers[0].attn_norm.weight.data_ptr() == enc.layers[0].attn_norm.weight.data_ptr()
    assert passage.layers[0].qkv.bias.data_ptr() == enc.layers[0].qkv.bias.data_ptr()
    assert passage.layers[0].qkv.weight.data_ptr() != enc.layers[0].qkv.weight.data_ptr()
    # the packed path takes the task too
    packed = padfree.PackedBatch.from_padded(ids, mask, types)
    assert max_diff(packed.unpack(enc.forward_packed(packed, task="separation")),
                    hf_run(model, ids, mask, kw, "separation"), mask) <= FP32_TOL
    with pytest.raises(ValueError, match="unknown task 'nope'.*retrieval.query"):
        enc(ids, mask, types, task="nope")


def test_no_adapters_in_the_checkpoint():
    model = make(0, adapters=False)
    enc = padfree.from_pretrained(model)
    ids, mask, types, kw = batch(model, LENGTHS, "left")
    assert max_diff(enc(ids, mask, types).last_hidden_state, hf_run(model, ids, mask, kw), mask) <= FP32_TOL
    with pytest.raises(ValueError, match="no task adapters"):
        padfree.from_pretrained(model, task="retrieval.query")
    with pytest.raises(ValueError, match="no task adapters"):
        enc(ids, mask, types, task="retrieval.query")


def test_task_for_a_family_without_adapters():
    from family_zoo import make as make_zoo
    with pytest.raises(ValueError, match="no task adapters"):
        padfree.from_pretrained(make_zoo("bert", 0), task="retrieval.query")


# ---------------------------------------------------------------------------------------------- loading
def save(model, path, original: bool = False) -> None:
    """``model`` as a directory in jinaai's layout, which transformers' save_pretrained writes for the base weights
    (fused ``mixer.Wqkv``, ``emb_ln``, ``norm1``/``norm2``) and jinaai's checkpoint has for the adapters: one
    adapter on the fused Q|K|V (block-diagonal factors of rank 3r give the three adapters' ``B A``; transformers
    would concatenate the [tasks, ...] factors along the task axis). ``original``: also jinaai's ``roberta.``
    prefix and torch-parametrization names (``X.parametrizations.weight.original``, ``...weight.0.lora_A``)."""
    from safetensors.torch import save_file
    model.save_pretrained(path)  # config.json and the layout of the base weights
    cfg, n, H, r = model.config, len(TASKS), model.config.hidden_size, model.config.lora_rank
    out = {}
    for key, v in model.state_dict().items():
        if ".self_attn." in key and ".o_proj." not in key:
            continue
        for a, b in (("embeddings.LayerNorm", "emb_ln"), ("layers.", "encoder.layers."), ("self_attn.o_proj",
                     "mixer.out_proj"), ("post_attention_layernorm", "norm1"), ("post_mlp_layernorm", "norm2")):
            key = key.replace(a, b)
        out[key] = v
    for i, layer in enumerate(model.layers):
        qkv = [layer.self_attn.get_submodule(x) for x in ("q_proj", "k_proj", "v_proj")]
        pre = f"encoder.layers.{i}.mixer.Wqkv"
        out[f"{pre}.weight"], out[f"{pre}.bias"] = torch.cat([m.weight for m in qkv]), torch.cat([m.bias for m in qkv])
        b = torch.zeros(n, 3 * H, 3 * r)
        for j, m in enumerate(qkv):
            b[:, j * H:(j + 1) * H, j * r:(j + 1) * r] = m.lora_B
        out[f"{pre}.lora_A"], out[f"{pre}.lora_B"] = torch.cat([m.lora_A for m in qkv], dim=1), b
    if original:
        renamed = {}
        for key, v in out.items():
            module, _, leaf = key.rpartition(".")
            if leaf in ("lora_A", "lora_B"):
                key = f"{module}.parametrizations.weight.0.{leaf}"
            elif leaf == "weight" and f"{module}.lora_A" in out:
                key = f"{module}.parametrizations.weight.original"
            renamed["roberta." + key] = v
        out = renamed
    save_file({k: v.detach().contiguous() for k, v in out.items()}, path / "model.safetensors")


@pytest.mark.parametrize("original", [False, True])
def test_directory_layouts(tmp_path, original):
    """jinaai's names load as transformers' module names do: the fused Q|K|V adapter, and with ``original`` the
    ``roberta.`` prefix and the parametrized names of jinaai's checkpoint."""
    model = make(0)
    save(model, tmp_path, original)
    keys = set(padfree.loading.read_weights(tmp_path))
    assert ("roberta.encoder.layers.0.mixer.Wqkv.parametrizations.weight.0.lora_A" if original
            else "encoder.layers.0.mixer.Wqkv.lora_A") in keys
    ids, mask, types, kw = batch(model, LENGTHS, "left")
    for task in ("separation", None):
        enc = padfree.from_pretrained(tmp_path, task=task)
        assert max_diff(enc(ids, mask, types).last_hidden_state, hf_run(model, ids, mask, kw, task),
                        mask) <= FP32_TOL, task


def _original_config(cfg) -> dict:
    """The config.json jinaai ships with jina-embeddings-v3 (its remote code's keys), for ``cfg``."""
    return {"model_type": "xlm-roberta", "architectures": ["XLMRobertaLoRA"], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size,
            "hidden_act": cfg.hidden_act, "max_position_embeddings": cfg.max_position_embeddings,
            "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps, "pad_token_id": 1,
            "position_embedding_type": "rotary", "rotary_emb_base": cfg.rope_parameters["rope_theta"],
            "lora_adaptations": TASKS, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
            "lora_dropout_p": 0.0, "lora_main_params_trainable": False, "load_trained_adapters": True,
            "use_flash_attn": True, "emb_pooler": None, "matryoshka_dimensions": [8, 16], "truncate_dim": None,
            "task_instructions": {t: f"{t}: " for t in TASKS}}


@pytest.mark.parametrize("shape", [0, 1])
def test_original_jina_config(tmp_path, shape):
    """jinaai's published directory: its config dialect (model_type xlm-roberta + rotary, rotary_emb_base) and its
    parametrized weight names under roberta., one fused Q|K|V adapter."""
    model = make(shape)
    save(model, tmp_path, original=True)
    (tmp_path / "config.json").write_text(json.dumps(_original_config(model.config)))
    ids, mask, types, kw = batch(model, LENGTHS, "left")
    for task in ("retrieval.query", None):
        enc = padfree.from_pretrained(tmp_path, task=task)
        assert enc.config.family == "jina_embeddings_v3"
        assert enc.config.rotary_theta == model.config.rope_parameters["rope_theta"]
        assert max_diff(enc(ids, mask, types).last_hidden_state, hf_run(model, ids, mask, kw, task),
                        mask) <= FP32_TOL, task
    conf = _original_config(model.config)
    del conf["rotary_emb_base"]  # its code's default base is 10000, not transformers' 20000
    (tmp_path / "config.json").write_text(json.dumps(conf))
    assert padfree.from_pretrained(tmp_path).config.rotary_theta == 10000.0


@pytest.mark.parametrize("key,value,match", [
    ("rotary_emb_interleaved", True, "rotary_emb_interleaved=True"),
    ("rotary_emb_scale_base", 512, "rotary_emb_scale_base=512"),
    ("rotary_emb_dim", 8, "rotary_emb_dim=8"),
    ("load_trained_adapters", False, "load_trained_adapters=False"),
    ("position_embedding_type", "alibi", "position_embedding_type 'alibi'"),
])
def test_unsupported_original_option_raises_before_weights(tmp_path, key, value, match):
    conf = _original_config(make(0, adapters=False).config)
    (tmp_path / "config.json").write_text(json.dumps({**conf, key: value}))
    with pytest.raises(ValueError, match=match):
        padfree.from_pretrained(tmp_path)


def _config_dir(tmp_path, **extra):
    """family_zoo's config-only directory (shape 0, rank 4, alpha 1) with the adapters' tasks."""
    return config_dir("jina_embeddings_v3", tmp_path, **{"lora_adaptations": TASKS, **extra})


@pytest.mark.parametrize("extra,match", [
    (dict(hidden_act="mish"), "unsupported activation 'mish'"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1000.0, "factor": 2.0}), "rope_type 'dynamic'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(head_dim=8), "head_dim 8"),
    (dict(is_decoder=True), "is_decoder"),
    (dict(lora_rank=0), "lora_rank"),
    (dict(lora_adaptations=["a", "a"]), "lora_adaptations"),
])
def test_unsupported_config_raises_before_weights(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        padfree.from_pretrained(_config_dir(tmp_path, **extra))


def test_unknown_task_raises_before_weights(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'retrieval'.*\['retrieval.query', 'retrieval.passage'"):
        padfree.from_pretrained(_config_dir(tmp_path), task="retrieval")


def test_unused_weights_are_errors():
    model = make(0)
    model.layers[0].mlp.fc1.lora_C = torch.nn.Parameter(torch.ones(3))  # not an adapter factor: a base weight
    with pytest.raises(ValueError, match="does not use.*lora_C"):
        padfree.from_pretrained(model)
    model = make(0)
    model.embeddings.LayerNorm.lora_A = torch.nn.Parameter(torch.ones(5, 2, 3))  # an adapter on no target
    model.embeddings.LayerNorm.lora_B = torch.nn.Parameter(torch.ones(5, 3, 2))
    with pytest.raises(ValueError, match="adapter weights padfree does not use.*LayerNorm.lora_A"):
        padfree.from_pretrained(model)


# ---------------------------------------------------------------------------------------------- heads
def test_sentence_encoder_with_tasks(tmp_path):
    """A sentence-transformers directory (modules.json, the saved model, mean pooling): the base weights match
    sentence-transformers (which loads transformers' model: no adapters); each task matches the oracle's mean."""
    from sentence_transformers import SentenceTransformer
    from test_heads import tokenizer
    model = make(1)  # the tokenizer's ids are below VOCAB
    tokenizer().save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    SentenceTransformer(str(tmp_path), device="cpu").save(str(tmp_path))  # modules.json, 1_Pooling (mean)
    save(model, tmp_path)  # the adapters as jinaai stores them
    texts = ["the cat on the mat", "a", "then the dog sat on the cat near the door of the house"]
    ours = padfree.SentenceEncoder.from_pretrained(tmp_path)
    theirs = SentenceTransformer(str(tmp_path), device="cpu").encode(texts)
    assert abs(ours.encode(texts) - theirs).max() <= FP32_TOL
    enc = tokenizer()(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    for task in ("retrieval.query", "text-matching"):
        h = hf_run(model, ids, mask, {}, task)
        ref = ((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy()
        got = ours.encode(texts, task=task)
        assert abs(got - ref).max() <= FP32_TOL, task
        assert abs(got - theirs).max() > 1e-2  # the adapter is applied
    at_load = padfree.SentenceEncoder.from_pretrained(tmp_path, task="text-matching")
    assert at_load.encoder.task == "text-matching"
    assert abs(at_load.encode(texts) - ours.encode(texts, task="text-matching")).max() <= 1e-6


def test_sequence_classification():
    """RoBERTa's head (dense + tanh on <s>, then out_proj) under roberta.; the encoder's adapter merged."""
    model = make(1, "seq", num_labels=3)
    ids, mask, types, kw = batch(model, LENGTHS, "right")  # HF's head reads column 0
    for task in (None, "classification"):
        clf = padfree.SequenceClassifier.from_pretrained(model, task=task)
        assert max_diff(clf(ids, mask, types).logits, hf_run(model, ids, mask, kw, task)) <= FP32_TOL, task


def test_token_classification():
    model = make(0, "token", num_labels=5)
    tc = padfree.TokenClassifier.from_pretrained(model, task="separation")
    for side in ("right", "left"):
        ids, mask, types, kw = batch(model, LENGTHS, side)
        ref = hf_run(model, ids, mask, kw, "separation")
        assert max_diff(tc(ids, mask, types).logits, ref, mask) <= FP32_TOL, side


@pytest.mark.parametrize("rope", [{}, {"rope_theta": 700.0}])
def test_rope_base_as_transformers_reads_it(rope):
    """A config.json without rope_parameters: HF's default_theta (20000), or a legacy top-level rope_theta."""
    from padfree.models.families import family_for
    cfg = t.JinaEmbeddingsV3Config(vocab_size=VOCAB, **{k: v for k, v in SHAPES[0].items() if k[:4] != "lora"})
    d = {k: v for k, v in cfg.to_dict().items() if k != "rope_parameters"} | rope
    theirs = t.JinaEmbeddingsV3Config.from_dict(d).rope_parameters["rope_theta"]
    assert family_for("jina_embeddings_v3").make_config(d).rotary_theta == theirs == rope.get("rope_theta", 20000.0)


def test_triton_allowed_here(triton_everywhere):
    """With the Triton backend allowed on this device (its interpreter on a CPU): jina-v3 runs on it whole, named
    (rotary in the attention kernel) and under "auto", and matches HF with a task merged."""
    from padfree.ops.registry import PRIMITIVES
    model = make(0)
    named = padfree.from_pretrained(model, backend="triton", task="retrieval.passage")
    assert set(named.kernels.names.values()) == {"triton", "composed(triton)"}, named.kernels.names
    enc = padfree.from_pretrained(model, task="retrieval.passage")
    assert {enc.kernels.names[op] for op in PRIMITIVES if op in enc.kernels.names} == {"triton"}
    ids, mask, types, kw = batch(model, [5, 40, 1, 17], "left")
    ref = hf_run(model, ids, mask, kw, "retrieval.passage")
    assert max_diff(enc(ids, mask, types).last_hidden_state, ref, mask) <= FP32_TOL
    assert max_diff(named(ids, mask, types).last_hidden_state, ref, mask) <= FP32_TOL
    other = enc.for_task("classification")  # built with the same backend choice
    assert other.backend == enc.backend and other.kernels.names == enc.kernels.names


# ---------------------------------------------------------------------------------------------- server
def test_server_task_per_request(tmp_path):
    """``padfree serve`` on a jina-v3 sentence-transformers directory: the request's ``task`` (as Jina's API names
    it) picks the adapter, on the OpenAI route through the openai client and on TEI's /embed; concurrent
    requests of different tasks each get their own adapter's vectors (the oracle: transformers with the LoRA
    applied per token, mean-pooled); an unknown task is a 422 naming the known ones."""
    import concurrent.futures

    import httpx
    import openai
    from sentence_transformers import SentenceTransformer
    from serving import Server
    from test_heads import tokenizer
    model = make(1)
    tokenizer().save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    SentenceTransformer(str(tmp_path), device="cpu").save(str(tmp_path))
    save(model, tmp_path)
    texts = ["the cat on the mat", "a", "then the dog sat on the cat near the door of the house"]
    enc = tokenizer()(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]

    def oracle(task):
        h = hf_run(model, ids, mask, {}, task)
        v = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.nn.functional.normalize(v, dim=-1) if (tmp_path / "2_Normalize").exists() else v

    server = Server(["--model", f"jina={tmp_path}"], tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

        def embed(task):
            extra = {} if task is None else {"extra_body": {"task": task}}
            got = client.embeddings.create(model="jina", input=texts, **extra)
            return torch.tensor([d.embedding for d in got.data])
        tasks = [None, "retrieval.query", "text-matching", "retrieval.query", None, "classification"]
        with concurrent.futures.ThreadPoolExecutor(len(tasks)) as pool:
            results = list(pool.map(embed, tasks))
        for task, got in zip(tasks, results):
            assert (got - oracle(task)).abs().max() <= FP32_TOL, task
        assert (results[1] - results[0]).abs().max() > 1e-2  # the adapter is applied
        r = httpx.post(server.url + "/embed", json={"inputs": texts, "task": "separation", "normalize": False})
        assert r.status_code == 200
        assert (torch.tensor(r.json()) - oracle("separation")).abs().max() <= FP32_TOL
        bad = httpx.post(server.url + "/v1/embeddings", json={"input": texts, "task": "summarize"})
        assert bad.status_code == 422 and "unknown task 'summarize'" in bad.text and "retrieval.query" in bad.text
    finally:
        assert server.stop() == 0


def test_job_with_a_task_adapter(tmp_path):
    """``padfree embed --task``: the job's embeddings are the adapter's (the transformers oracle, mean-pooled);
    the task is part of the job's options (a rerun with another refuses); an unknown task is a one-line error."""
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer
    from test_heads import tokenizer
    model = make(1)
    st = tmp_path / "st"
    tokenizer().save_pretrained(st)
    model.save_pretrained(st)
    SentenceTransformer(str(st), device="cpu").save(str(st))
    save(model, st)
    texts = ["the cat on the mat", "a", "then the dog sat on the cat near the door of the house"]
    pq.write_table(pa.table({"id": [10, 11, 12], "text": texts}), tmp_path / "in.parquet")

    def job(*extra):
        return subprocess.run([sys.executable, "-m", "padfree.cli", "embed", str(tmp_path / "in.parquet"),
                               str(tmp_path / "out"), "--model", str(st), "--id-column", "id", "--no-progress",
                               *extra], capture_output=True, text=True, timeout=300)
    r = job("--task", "retrieval.passage")
    assert r.returncode == 0, r.stderr
    got = pq.read_table(tmp_path / "out").sort_by("id")
    enc = tokenizer()(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    h = hf_run(model, ids, mask, {}, "retrieval.passage")
    ref = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert (torch.tensor(got.column("embedding").to_pylist()) - ref).abs().max() <= FP32_TOL
    r = job("--task", "text-matching")
    assert r.returncode != 0 and "--task: 'retrieval.passage' before, 'text-matching' now" in r.stderr
    r = job("--task", "summarize", "--overwrite")
    assert r.returncode != 0 and "unknown task 'summarize'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
