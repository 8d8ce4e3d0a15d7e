"""Where the Gluon kernels run (``moekit.ops.triton.gluon_rules``): the ``gluon`` setting's auto
rule, decided on CPU tensors with the "can it run here" check pretended true (the kernels
themselves are tested on the GPU, ``tests/test_triton_gpu.py``)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from moekit.ops.triton import gluon_rules as G  # noqa: E402


@pytest.fixture
def hopper(monkeypatch):
    """As on a Hopper GPU with Gluon importable."""
    monkeypatch.setattr(G, "_gluon_unavailable", lambda t: None)


def _rows(n_per_expert: int, E: int, O: int, I: int, o_contig: bool = False):
    a = torch.empty(n_per_expert * E, I, dtype=torch.bfloat16)
    w = torch.empty(E, I, O, dtype=torch.bfloat16).transpose(1, 2) if o_contig else \
        torch.empty(E, O, I, dtype=torch.bfloat16)
    return a, w


def test_rows_auto_rule(hopper):
    E = 4
    # fine-grained down projection at 1024 rows per expert: taken
    assert G.gluon_rows_wanted(None, *_rows(1024, E, 2048, 768))
    # fewer rows per expert, a wide or deep GEMM, an O-contiguous weight: not by default
    assert not G.gluon_rows_wanted(None, *_rows(512, E, 2048, 768))
    assert not G.gluon_rows_wanted(None, *_rows(1024, E, 4096, 768))
    assert not G.gluon_rows_wanted(None, *_rows(1024, E, 2048, 4096))
    assert not G.gluon_rows_wanted(None, *_rows(1024, E, 2048, 768, o_contig=True))
    # a Triton row-GEMM tile asked for is a tile used
    a, w = _rows(1024, E, 2048, 768)
    assert not G.gluon_rows_wanted({"rows": (128, 128, 64, 8, 3)}, a, w)
    assert not G.gluon_rows_wanted({"gemm": (128, 128, 64, 8, 3)}, a, w)
    # True: wherever the operands suit TMA, whatever the size or layout; False: never
    for args in (_rows(8, E, 4096, 768), _rows(8, E, 200, 264, o_contig=True)):
        assert G.gluon_rows_wanted({"gluon": (1,)}, *args)
    assert not G.gluon_rows_wanted({"gluon": (0,)}, a, w)
    # what TMA cannot take: O not a multiple of 8, a weight with neither dim contiguous
    assert not G.gluon_rows_wanted({"gluon": (1,)}, *_rows(8, E, 100, 264))
    w_strided = torch.empty(E, 2 * 2048, 2 * 768, dtype=torch.bfloat16)[:, ::2, ::2]
    assert not G.gluon_rows_wanted({"gluon": (1,)}, a, w_strided)


def test_weight_grad_auto_rule(hopper):
    E = 4
    lm, rm = torch.empty(1024 * E, 768, dtype=torch.bfloat16), torch.empty(1024 * E, 2048, dtype=torch.bfloat16)
    assert G.gluon_wanted(None, lm, rm, E)
    assert not G.gluon_wanted(None, lm[: 512 * E], rm[: 512 * E], E)
    assert G.gluon_wanted({"gluon": (1,)}, lm[: 512 * E], rm[: 512 * E], E)
    assert not G.gluon_wanted({"gluon": (0,)}, lm, rm, E)
    assert not G.gluon_wanted({"gluon": (1,)}, lm[:, :100], rm, E)  # not contiguous


def test_gather_weight_grad_auto_rule(hopper):
    """The in-kernel gather (one operand gathered by token, ``gluon_gather_wanted``): auto takes
    fine-grained experts at 1024 rows per expert or more, unless a weight-grad tile was given."""
    E, T = 4, 512
    src, other = torch.empty(T, 2048, dtype=torch.bfloat16), torch.empty(1024 * E, 768, dtype=torch.bfloat16)
    assert G.gluon_gather_wanted(None, src, other, 1024 * E, E)
    assert G.gluon_gather_wanted(None, other[:T], src[:, :1536], 1024 * E, E)  # dH.T @ x[tok]
    assert not G.gluon_gather_wanted(None, src, other, 512 * E, E)
    wide = torch.empty(T, 2880, dtype=torch.bfloat16)  # GPT-OSS's and larger experts: not by default
    assert not G.gluon_gather_wanted(None, wide, other, 1024 * E, E)
    assert not G.gluon_gather_wanted(None, src, torch.empty(1024 * E, 4096, dtype=torch.bfloat16), 1024 * E, E)
    assert not G.gluon_gather_wanted({"dw": (128, 256, 64, 8, 3)}, src, other, 1024 * E, E)
    # True: any size; False: never; never what its copies cannot take
    assert G.gluon_gather_wanted({"gluon": (1,)}, wide, other, 8, E)
    assert not G.gluon_gather_wanted({"gluon": (0,)}, src, other, 1024 * E, E)
    assert not G.gluon_gather_wanted({"gluon": (1,)}, src[:, :100], other, 8, E)  # width 100
    assert not G.gluon_gather_wanted({"gluon": (1,)}, src[:, 1:], other, 8, E)  # width 2047, unaligned
    assert not G.gluon_gather_wanted({"gluon": (1,)}, src, other.half(), 8, E)  # mixed dtypes


def test_true_raises_where_it_cannot_run():
    """Off Hopper (here: CPU) auto and False say no, True names why."""
    a, w = _rows(8, 2, 64, 64)
    assert not G.gluon_rows_wanted(None, a, w)
    with pytest.raises(RuntimeError, match="gluon=True, but the Gluon kernels cannot run"):
        G.gluon_rows_wanted({"gluon": (1,)}, a, w)
    assert not G.gluon_gather_wanted(None, a, a, 1024 * 2, 2)
    with pytest.raises(RuntimeError, match="gluon=True, but the Gluon kernels cannot run"):
        G.gluon_gather_wanted({"gluon": (1,)}, a, a, 8, 2)
