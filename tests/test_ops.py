"""The portable backend against the pure-PyTorch references, and the backend registry."""
import pytest
import torch

from padfree import ops
from padfree.ops import torch_backend
from padfree.ops.registry import Kernels, select


def ragged(lengths, H=64, heads=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    qkv = torch.randn(T, 3 * H, generator=g).to(dtype)
    bias = torch.randn(3 * H, generator=g).to(dtype)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return qkv, bias, cu, max(lengths)


@pytest.mark.parametrize("lengths", [[1], [5, 1, 17, 5, 5, 9], [33] * 3 + [2]])
def test_varlen_attention_matches_reference(lengths):
    qkv, bias, cu, S = ragged(lengths)
    ref = ops.varlen_attention_ref(qkv, cu, S, 4, bias)
    out = torch_backend.varlen_attention(qkv, cu, S, 4, bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_varlen_attention_ignores_other_sequences():
    """Changing one sequence's tokens must not change another's output (no cross-sequence attention)."""
    qkv, bias, cu, S = ragged([4, 6])
    out = torch_backend.varlen_attention(qkv, cu, S, 4, bias)
    qkv2 = qkv.clone()
    qkv2[4:] = torch.randn(6, qkv.shape[1])
    out2 = torch_backend.varlen_attention(qkv2, cu, S, 4, bias)
    assert torch.equal(out[:4], out2[:4]) and not torch.allclose(out[4:], out2[4:])


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu", "silu", "quick_gelu"])
def test_bias_act_and_layer_norm_match_reference(act):
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(7, 48, generator=g), torch.randn(7, 48, generator=g)
    b, w, lb = (torch.randn(48, generator=g) for _ in range(3))
    torch.testing.assert_close(ops.bias_act(x, b, act), ops.bias_act_ref(x, b, ops.canonical_activation(act)))
    torch.testing.assert_close(ops.add_bias_residual_layer_norm(x, b, r, w, lb, 1e-12),
                               ops.add_bias_residual_layer_norm_ref(x, b, r, w, lb, 1e-12))


def test_embed_layer_norm_matches_reference():
    g = torch.Generator().manual_seed(2)
    word, pos, typ = torch.randn(50, 16, generator=g), torch.randn(20, 16, generator=g), torch.randn(2, 16, generator=g)
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    ids, p, t = torch.randint(0, 50, (9,)), torch.randint(0, 20, (9,)), torch.randint(0, 2, (9,))
    torch.testing.assert_close(ops.embed_layer_norm(ids, p, t, word, pos, typ, w, b, 1e-5),
                               ops.embed_layer_norm_ref(ids, p, t, word, pos, typ, w, b, 1e-5))
    torch.testing.assert_close(ops.embed_layer_norm(ids, None, None, word, None, None, w, b, 1e-5),
                               ops.embed_layer_norm_ref(ids, None, None, word, None, None, w, b, 1e-5))


def test_unsupported_activation_names_it():
    with pytest.raises(ValueError, match="'mish'"):
        ops.canonical_activation("mish")


def test_selector_lists_every_reason():
    with pytest.raises(ValueError) as e:
        select("varlen_attention", "cpu", torch.float32, 64, backend="triton")
    assert "device cpu" in str(e.value)
    with pytest.raises(ValueError, match="unknown backend"):
        select("bias_act", "cpu", torch.float32, backend="nope")
    with pytest.raises(ValueError, match="dtype"):
        select("bias_act", "cpu", torch.int32)
    assert Kernels.resolve("cpu", torch.float32, 64).names["varlen_attention"] == "torch"
