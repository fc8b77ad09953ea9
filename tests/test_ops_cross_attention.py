"""The cross-attention custom op (compiled CUDA graphs keep its strided queries) against plain SDPA."""

from __future__ import annotations

import torch

from sanaflow.ops.cross_attention import _attend_tokens_op, attend_tokens


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, n, h, d, length = 2, 12, 3, 8, 7
    q = torch.randn(b, n, h * d, generator=g).unflatten(2, (h, d)).transpose(1, 2)  # strided (B, h, N, d) view
    k = torch.randn(b, h, length, d, generator=g)
    v = torch.randn(b, h, length, d, generator=g)
    mask = torch.ones(b, length)
    mask[1, 4:] = 0  # the second caption is shorter
    bias = ((1 - mask) * -1e4)[:, None, None, :]  # (B, 1, 1, L)
    return q, k, v, bias


def _direct(q, k, v, bias):
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias  # (B, h, N, L)
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)  # (B, N, h * d)


def test_op_and_cpu_path_match_a_direct_attention():
    q, k, v, bias = _inputs()
    want = _direct(q, k, v, bias)
    torch.testing.assert_close(attend_tokens(q, k, v, bias), want, rtol=1e-5, atol=1e-5)
    out = _attend_tokens_op(q, k, v, bias)  # the CUDA path's op, run on CPU tensors
    assert out.is_contiguous() and out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_attend_tokens_op(q, k, v, None), _direct(q, k, v, torch.zeros_like(bias)),
                               rtol=1e-5, atol=1e-5)


def test_op_registration_is_consistent():
    q, k, v, bias = _inputs(1)
    # schema, fake (meta) implementation and real outputs agree in shape, dtype and strides
    torch.library.opcheck(_attend_tokens_op, (q, k, v, bias), test_utils=("test_schema", "test_faketensor"))


def test_op_compiles_without_graph_breaks():
    q, k, v, bias = _inputs(2)
    fn = torch.compile(lambda *a: _attend_tokens_op(*a) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(q, k, v, bias), 2 * _direct(q, k, v, bias), rtol=1e-5, atol=1e-5)
