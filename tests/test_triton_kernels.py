"""The triton experts backend on CPU, under Triton's interpreter (``TRITON_INTERPRET=1``).

Triton decides at decoration time whether a kernel is interpreted, and ``moekit.ops`` imports the
backend eagerly, so the interpreter cases must run in a process that had ``TRITON_INTERPRET=1``
from its start. When this file is collected in such a process the cases are defined directly;
otherwise one test re-runs this file under pytest in a subprocess with the variable set (and
shows its output on failure). Skipped where triton is missing.

Checked against the loop backend in float64 (the ground truth): forward and every gradient
(x, both weights, both biases, routing weights) for every activation, gated and not, weight on
input or output, fp32 (tight) and fp16 (the tolerance rule of docs/architecture.md against the plain PyTorch
path in fp16), T=0, T=1, empty experts, all tokens on one expert, top_k=1 and top_k=E, odd dims,
capacity drops, determinism, the custom ops' fake implementations, the staged grouped linear,
and every ``TritonBackend.Config`` setting reaching its code path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import torch

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


if not INTERP:

    def test_interpreter_suite():
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
        env.pop("PYTEST_ADDOPTS", None)
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
             __file__],
            env=env, capture_output=True, text=True, timeout=900, check=False,
        )
        assert r.returncode == 0, f"interpreter suite failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"

    def test_launch_config_overrides_pick_the_config(monkeypatch):
        """Each tile setting of TritonBackend.Config is the launch config of its kernel (off the
        interpreter, which always takes its small tiles)."""
        from moekit.ops.triton import launch_config
        from moekit.ops.triton_backend import DownCombineTile, GemmTile, TritonBackend, parse_tiles

        monkeypatch.setattr(launch_config, "interpreting", lambda: False)
        cfg = TritonBackend.Config(
            gemm_tile=GemmTile(64, 128, 32, 4, 2), kind_tiles={"decode_rows": GemmTile(32, 64, 64, 2, 2)},
            dw_tile=(32, 32, 16, 2, 2), down_combine_tile=DownCombineTile(8, 32, 2, 1),
        )
        tiles = parse_tiles(cfg.tiles_spec())
        bf16 = torch.bfloat16
        g = launch_config._gemm_config(4096, 8, 512, "rows", bf16, tiles)  # training rows: gemm_tile
        assert (g.BLOCK_M, g.BLOCK_N, g.BLOCK_K, g.num_warps, g.num_stages) == (64, 128, 32, 4, 2)
        g = launch_config._gemm_config(4096, 8, 512, "up_gated", bf16, tiles)  # half BN per accumulator
        assert (g.BLOCK_M, g.BLOCK_N) == (64, 64)
        g = launch_config._gemm_config(16, 8, 512, "rows", bf16, tiles)  # decode rows: its own tile
        assert (g.BLOCK_M, g.BLOCK_N, g.BLOCK_K, g.num_warps, g.num_stages) == (32, 64, 64, 2, 2)
        assert launch_config._gemm_config(4096, 8, 512, "rows", bf16, None).BLOCK_N == 256  # the default
        assert launch_config._dw_config(bf16, tiles) == (32, 32, 16, 2, 2)
        assert tiles["down_combine"] == (8, 32, 2, 1)

    def test_the_registered_triton_backend_takes_the_environment_overrides(monkeypatch):
        """The backend chosen by the name "triton" has the default settings plus the
        environment's overrides (how the benchmark's sweeps reach them), read again when the
        environment changes; an explicit config is used as it is."""
        from moekit.ops.backends import default_backend
        from moekit.ops.triton_backend import TritonBackend

        monkeypatch.delenv("MOEKIT_TRITON_DGRAD", raising=False)
        assert default_backend("triton").config == TritonBackend.Config()
        monkeypatch.setenv("MOEKIT_TRITON_DGRAD", "split")
        monkeypatch.setenv("MOEKIT_TRITON_FUSED_DECODE_T", "3")
        b = default_backend("triton")
        assert (b.config.dgrad, b.config.fused_decode_tokens) == ("split", 3)
        assert default_backend("triton") is b  # one object per environment
        assert TritonBackend.Config(dgrad="fused").build().config.dgrad == "fused"

    def test_settings_are_validated_and_read_from_the_environment():
        from moekit.ops.triton_backend import ENV_VARS, GemmTile, TritonBackend

        C = TritonBackend.Config
        for bad, err, msg in [
            (dict(dgrad="both"), ValueError, "allowed: ('auto', 'fused', 'split', 'grouped_mm')"),
            (dict(dw="cublas"), ValueError, "allowed: ('auto', 'triton', 'grouped_mm')"),
            (dict(recompute_act="sometimes"), TypeError, "recompute_act='sometimes'"),
            (dict(inplace_dgrad=1), TypeError, "inplace_dgrad=1"),
            (dict(fused_decode_tokens=-1), ValueError, "fused_decode_tokens=-1"),
            (dict(pdl="yes"), TypeError, "pdl='yes'"),
            (dict(tma=1), TypeError, "tma=1; allowed: None (auto), True, False"),
            (dict(gather_x="yes"), TypeError, "gather_x='yes'; allowed: None (auto), True, False"),
            (dict(gluon="on"), TypeError, "gluon='on'; allowed: None (auto), True, False"),
            (dict(gemm_tile=(128, 0, 64)), ValueError, "expected 5 positive integers"),
            (dict(kind_tiles={"down": GemmTile(16, 16, 16)}), ValueError, "has key 'down'"),
            (dict(dw_tile="128,128,64,8,3"), TypeError, "dw_tile must be a GemmTile"),
            (dict(down_combine_tile=(4, 0, 4, 1)), ValueError, "expected 4 positive integers"),
        ]:
            with pytest.raises(err, match=re.escape(msg)):
                C(**bad)
        env = {"MOEKIT_TRITON_DGRAD": "split", "MOEKIT_TRITON_DW": "grouped_mm",
               "MOEKIT_TRITON_RECOMPUTE_ACT": "1", "MOEKIT_TRITON_INPLACE_DGRAD": "0",
               "MOEKIT_TRITON_FUSED_DECODE_T": "8", "MOEKIT_TRITON_PDL": "0", "MOEKIT_TRITON_TMA": "0",
               "MOEKIT_TRITON_PERSISTENT": "0", "MOEKIT_TRITON_GATHER_X": "1", "MOEKIT_TRITON_GLUON": "0",
               "MOEKIT_TRITON_CONFIG": "128,256,64,8,3", "MOEKIT_TRITON_DW_CONFIG": "64,64,32,4,3",
               "MOEKIT_TRITON_DOWN_COMBINE_CONFIG": "4,64,4,1",
               "MOEKIT_TRITON_DECODE_UP_GATED_CONFIG": "16,32,128,4,4"}
        c = C.from_env(env)
        assert (c.dgrad, c.dw, c.recompute_act, c.inplace_dgrad, c.fused_decode_tokens, c.pdl, c.tma) == (
            "split", "grouped_mm", True, False, 8, False, False)
        assert "tma=0" in c.tiles_spec() and C.from_env({"MOEKIT_TRITON_TMA": "auto"}).tma is None
        assert c.persistent is False and "persistent=0" in c.tiles_spec()
        assert c.gather_x is True and "gather_x=1" in c.tiles_spec() and C().gather_x is None
        assert c.gluon is False and "gluon=0" in c.tiles_spec() and C().to_dict()["gluon"] is None
        assert C().to_dict()["tma"] is None and C().to_dict()["persistent"] is True
        assert c.gemm_tile == GemmTile(128, 256, 64, 8, 3) and c.dw_tile == GemmTile(64, 64, 32, 4, 3)
        assert c.kind_tiles == {"decode_up_gated": GemmTile(16, 32, 128, 4, 4)}
        assert c.down_combine_tile.block_f == 64
        assert C.from_env({}) == C() and len(ENV_VARS) == 21
        d = C(dgrad="fused").to_dict()
        assert d["name"] == "triton" and d["dgrad"] == "fused"
        for var, text, msg in [("MOEKIT_TRITON_DW_CONFIG", "128,128,64", "MOEKIT_TRITON_DW_CONFIG='128,128,64': expected 5"),
                               ("MOEKIT_TRITON_DOWN_COMBINE_CONFIG", "4,x,4,1", "BD,BF,warps,stages"),
                               ("MOEKIT_TRITON_RECOMPUTE_ACT", "sometimes", "allowed: 'auto', '0', '1'"),
                               ("MOEKIT_TRITON_DGRAD", "both", "allowed: ('auto', 'fused', 'split', 'grouped_mm')"),
                               ("MOEKIT_TRITON_FUSED_DECODE_T", "-1", "non-negative integer"),
                               ("MOEKIT_TRITON_PDL", "yes", "0 or 1")]:
            with pytest.raises(ValueError, match=re.escape(msg)):
                C.from_env({var: text})

    def test_backend_not_available_on_cpu_without_interpreter(monkeypatch):
        from moekit.ops import available_backends
        from moekit.ops.triton import triton_available

        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert not triton_available(torch.device("cpu"), torch.float32)
        assert "triton" not in available_backends(torch.device("cpu"))
        assert not triton_available(torch.device("cuda"), torch.int32)

else:
    from moekit.ops import TritonBackend, moe_experts
    from moekit.plan import make_plan

    from reference import deinterleave_gate_up, interleave_gate_up

    def _inputs(T, D, F, E, K, gated, *, bias, seed, ids=None, scale=1.0):
        g = torch.Generator().manual_seed(seed)
        H = 2 * F if gated else F
        x = torch.randn(T, D, generator=g, dtype=torch.float64) * scale
        w1 = torch.randn(E, H, D, generator=g, dtype=torch.float64) * D ** -0.5
        w2 = torch.randn(E, D, F, generator=g, dtype=torch.float64) * F ** -0.5
        b1 = torch.randn(E, H, generator=g, dtype=torch.float64) * 0.5 if bias else None
        b2 = torch.randn(E, D, generator=g, dtype=torch.float64) * 0.5 if bias else None
        if ids is None:
            ids = torch.randn(T, E, generator=g).topk(K, dim=-1).indices
        wts = torch.rand(T, K, generator=g, dtype=torch.float64) + 0.1
        gy = torch.randn(T, D, generator=g, dtype=torch.float64)
        return [x, w1, w2, b1, b2, wts], ids, gy

    def _run(backend, ts, ids, gy, dtype, act, woi, plan=None):
        leaves = [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in ts]
        x, w1, w2, b1, b2, wts = leaves
        y = moe_experts(x, w1, w2, ids, wts, activation=act, gate_up_proj_bias=b1,
                        down_proj_bias=b2, backend=backend, weight_on_input=woi, plan=plan)
        live = [t for t in leaves if t is not None]
        if y.numel() == 0:
            grads = [torch.zeros_like(t) for t in live]
        else:
            grads = list(torch.autograd.grad(y, live, gy.to(dtype), allow_unused=True))
            grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(live, grads)]
        return [y.detach()] + grads

    def _names(bias):
        return ["y", "dx", "dw_up", "dw_down"] + (["db_up", "db_down"] if bias else []) + ["dtopk"]

    def _max_err(a, b):
        if a.numel() == 0:
            return 0.0
        return (a.double() - b.double()).abs().max().item()

    def _scale(t):
        return max(1.0, t.double().abs().max().item()) if t.numel() else 1.0

    def _check_fp32(ts, ids, gy, act, woi, bias, plan=None, tol=2e-5, backend="triton"):
        truth = _run("loop", ts, ids, gy, torch.float64, act, woi, plan)
        fast = _run(backend, ts, ids, gy, torch.float32, act, woi, plan)
        for name, a, t in zip(_names(bias), fast, truth):
            assert a.shape == t.shape, name
            assert torch.isfinite(a).all(), name
            err, s = _max_err(a, t), _scale(t)
            assert err <= tol * s, f"{name}: max err {err:.3e} > {tol:.0e} * {s:.3e}"

    ACTS = [("silu", True), ("gelu", True), ("gelu_tanh", True), ("gpt_oss", True),
            ("relu2", False), ("silu", False), ("gelu_tanh", False)]

    @pytest.mark.parametrize("act,gated", ACTS, ids=[f"{a}-{'gated' if g else 'plain'}" for a, g in ACTS])
    @pytest.mark.parametrize("bias,woi", [(True, False), (False, True)], ids=["bias", "weight_on_input"])
    def test_fp32_all_grads(act, gated, bias, woi):
        T, D, F, E, K = 21, 24, 20, 5, 2
        # gpt_oss: a larger input scale so that the clamps (+-7) are exercised
        ts, ids, gy = _inputs(T, D, F, E, K, gated, bias=bias, seed=hash((act, gated, woi)) % 1000,
                              scale=6.0 if act == "gpt_oss" else 1.0)
        ids[ids == 3] = 4  # expert 3 gets no tokens
        _check_fp32(ts, ids, gy, act, woi, bias)

    @pytest.mark.parametrize("act,gated,bias,woi", [("silu", True, True, False), ("relu2", False, False, True),
                                                   ("gpt_oss", True, True, False)])
    def test_fp16_tolerance_rule(act, gated, bias, woi):
        T, D, F, E, K = 40, 32, 24, 6, 3
        ts, ids, gy = _inputs(T, D, F, E, K, gated, bias=bias, seed=7,
                              scale=4.0 if act == "gpt_oss" else 1.0)
        truth = _run("loop", ts, ids, gy, torch.float64, act, woi)
        plain = _run("loop", ts, ids, gy, torch.float16, act, woi)
        fast = _run("triton", ts, ids, gy, torch.float16, act, woi)
        for name, a, p, t in zip(_names(bias), fast, plain, truth):
            assert a.dtype == torch.float16 and torch.isfinite(a).all(), name
            e_a, e_p, s = _max_err(a, t), _max_err(p, t), _scale(t)
            assert e_a <= 2 * e_p + 2e-3 * s, f"{name}: err {e_a:.3e} > 2 * plain {e_p:.3e} + atol"

    @pytest.mark.parametrize(
        "T,D,F,E,K,how",
        [
            (1, 24, 16, 4, 2, "random"),  # T=1
            (17, 20, 12, 4, 1, "random"),  # top_k=1
            (9, 16, 16, 4, 4, "all"),  # top_k=E
            (19, 16, 16, 6, 2, "one_expert"),  # every token on experts 0 and 1: the rest empty
            (13, 37, 19, 3, 2, "random"),  # odd dims
        ],
    )
    def test_edge_shapes(T, D, F, E, K, how):
        ids = None
        if how == "all":
            ids = torch.stack([torch.randperm(E) for _ in range(T)])
        elif how == "one_expert":
            ids = torch.tensor([[0, 1]] * T)
        ts, ids, gy = _inputs(T, D, F, E, K, True, bias=True, seed=T, ids=ids)
        _check_fp32(ts, ids, gy, "silu", False, True)

    def test_t0():
        ts, ids, gy = _inputs(0, 16, 8, 4, 2, True, bias=True, seed=0,
                              ids=torch.zeros(0, 2, dtype=torch.int64))
        out = _run("triton", ts, ids, gy, torch.float32, "silu", False)
        assert out[0].shape == (0, 16)
        for g in out[1:]:
            assert torch.count_nonzero(g) == 0

    def test_capacity_drops():
        T, D, F, E, K = 24, 16, 12, 4, 2
        ts, ids, gy = _inputs(T, D, F, E, K, True, bias=True, seed=3)
        plan = make_plan(ids, E, capacity_factor=0.5)
        assert int(plan.num_dropped) > 0
        _check_fp32(ts, ids, gy, "silu", False, True, plan=plan)

    def test_zero_expert_slots():
        """Slots of zero-computation experts (ids >= E) take no rows: as capacity drops."""
        T, D, F, E, K = 24, 16, 12, 4, 2
        ids = torch.randn(T, E + 2, generator=torch.Generator().manual_seed(5)).topk(K, -1).indices
        ts, _, gy = _inputs(T, D, F, E, K, True, bias=True, seed=3, ids=ids)
        plan = make_plan(ids, E, num_zero_experts=2)
        assert (plan.inverse_TK < 0).any() and int(plan.num_dropped) == 0
        _check_fp32(ts, ids, gy, "silu", False, True, plan=plan)

    def test_deterministic():
        ts, ids, gy = _inputs(30, 16, 16, 4, 2, True, bias=True, seed=11)
        a = _run("triton", ts, ids, gy, torch.float32, "silu", False)
        b = _run("triton", ts, ids, gy, torch.float32, "silu", False)
        for x, y in zip(a, b):
            assert torch.equal(x, y)

    def test_fake_impls_match():
        """Every custom op's fake implementation gives the real output's shapes and dtypes."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        from moekit.ops.triton import custom_ops as ops

        ts, ids, _ = _inputs(10, 16, 8, 3, 2, True, bias=True, seed=1)
        x, w1, w2, b1, b2, wts = [t.float() for t in ts]
        plan = make_plan(ids, 3)
        roww = wts.reshape(-1).index_select(0, plan.sorted_slots_N)
        pargs = (plan.counts_E, plan.offsets_E)
        calls = [
            (ops.up_op, (x, w1, b1, plan.token_ids_N, None, *pargs, "silu", True, True)),
            (ops.rows_gemm_op, (torch.randn(20, 8), w2, b2, *pargs)),
            (ops.combine_op, (torch.randn(20, 16), plan.inverse_TK, wts, x)),
            (ops.down_combine_op, (torch.randn(20, 8), w2, b2, plan.inverse_TK, plan.expert_ids_N, wts)),
            (ops.down_dgrad_op, (x, w2, b2, plan.token_ids_N, roww, torch.randn(20, 16), *pargs,
                                 "silu", True, False, True)),
            (ops.down_dgrad_op, (x, w2, b2, plan.token_ids_N, roww, torch.randn(20, 16), *pargs,
                                 "silu", True, False, False)),
            (ops.down_dgrad_op, (x, w2, b2, plan.token_ids_N, roww, torch.randn(20, 16), *pargs,
                                 "silu", True, False, True, plan.expert_ids_N)),
            (ops.weight_grad_op, (x, plan.token_ids_N, torch.randn(20, 8), None, roww, True, *pargs,
                                  True)),
        ]
        for op, args in calls:
            real = op(*args)
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
                fake = op(*fargs)
            real = real if isinstance(real, tuple) else (real,)
            fake = fake if isinstance(fake, tuple) else (fake,)
            for r, f in zip(real, fake):
                assert tuple(r.shape) == tuple(f.shape) and r.dtype == f.dtype, op

    @pytest.mark.parametrize("dgrad", ["fused", "split", "by name"])
    def test_compile_fullgraph_traces(dgrad):
        """torch.compile(fullgraph=True) traces moe_experts through the custom ops (aot_eager:
        the kernels still run in the interpreter), with either dgrad, and with the backend
        chosen by name inside the traced function."""
        backend = "triton" if dgrad == "by name" else TritonBackend.Config(dgrad=dgrad).build()
        ts, ids, gy = _inputs(12, 16, 8, 4, 2, True, bias=True, seed=5)
        x, w1, w2, b1, b2, wts = [t.float().requires_grad_(True) for t in ts]

        def f(x, w1, w2, b1, b2, wts):
            return moe_experts(x, w1, w2, ids, wts, activation="silu", gate_up_proj_bias=b1,
                               down_proj_bias=b2, backend=backend)

        torch._dynamo.reset()
        y_c = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w1, w2, b1, b2, wts)
        y_e = f(x, w1, w2, b1, b2, wts)
        torch.testing.assert_close(y_c, y_e)
        g_c = torch.autograd.grad(y_c, [x, w1, w2, b1, b2, wts], gy.float())
        g_e = torch.autograd.grad(y_e, [x, w1, w2, b1, b2, wts], gy.float())
        for a, b in zip(g_c, g_e):
            torch.testing.assert_close(a, b)

    @pytest.mark.parametrize("bias,woi", [(True, False), (False, True)])
    def test_weight_grads_through_grouped_mm(monkeypatch, bias, woi):
        """The large-expert weight-grad path (torch grouped_mm over gathered rows), forced by
        ``dw="grouped_mm"`` (and not taken with ``dw="triton"``)."""
        from moekit.ops.triton import weight_grads

        if weight_grads._grouped_mm is None:
            pytest.skip("torch has no grouped_mm")
        calls = []
        real = weight_grads.grouped_mm
        monkeypatch.setattr(weight_grads, "grouped_mm", lambda *a: calls.append(1) or real(*a))
        T, D, F, E, K = 20, 16, 24, 5, 2
        ts, ids, gy = _inputs(T, D, F, E, K, True, bias=bias, seed=21)
        ids[ids == 2] = 3  # an expert without rows
        _check_fp32(ts, ids, gy, "silu", woi, bias, backend=TritonBackend.Config(dw="grouped_mm"))
        # the input grad's rows, the dgrad GEMM and (without a down bias) the forward's down
        # projection by torch grouped_mm
        assert len(calls) == (2 if bias else 3)
        calls.clear()
        # inference (no grad), without a down bias: the down projection by grouped_mm too
        x, w1, w2, b1, _, wts = [None if t is None else t.float() for t in ts]
        with torch.no_grad():
            got = moe_experts(x, w1, w2, ids, wts, activation="silu", gate_up_proj_bias=b1,
                              backend=TritonBackend.Config(dw="grouped_mm"))
            want = moe_experts(x.double(), w1.double(), w2.double(), ids, wts.double(),
                               activation="silu", gate_up_proj_bias=None if b1 is None else b1.double(),
                               backend="loop")
        assert _max_err(got, want) <= 2e-5 * _scale(want)
        assert calls == [1]
        calls.clear()
        assert not weight_grads.dw_uses_grouped_mm(T * K, E, D, F, torch.float32, torch.device("cpu"), "triton")
        assert weight_grads.dw_uses_grouped_mm(T * K, E, D, F, torch.float32, torch.device("cpu"), "grouped_mm")

    def test_gluon_setting_off_hopper():
        """The Gluon kernels run on Hopper GPUs only: here (the interpreter, CPU) ``gluon=None``
        and ``False`` keep torch's grouped GEMM and the Triton row GEMMs, and ``True`` raises
        naming why."""
        from moekit.ops.triton import gluon_rules, weight_grads

        if weight_grads._grouped_mm is None:
            pytest.skip("torch has no grouped_mm")
        T, D, F, E, K = 20, 16, 24, 5, 2
        ts, ids, gy = _inputs(T, D, F, E, K, True, bias=False, seed=22)
        for gluon in (None, False):
            _check_fp32(ts, ids, gy, "silu", False, False,
                        backend=TritonBackend.Config(dw="grouped_mm", gluon=gluon))
        l, r = torch.randn(8, 16), torch.randn(8, 8)
        assert not gluon_rules.gluon_wanted(None, l, r, 1)
        assert not gluon_rules.gluon_wanted({"gluon": (0,)}, l, r, 1)
        w = torch.randn(2, 8, 16)
        assert not gluon_rules.gluon_rows_wanted(None, l, w)
        assert not gluon_rules.gluon_rows_wanted({"gluon": (0,)}, l, w)
        with pytest.raises(RuntimeError, match="gluon=True, but the Gluon kernels cannot run"):
            gluon_rules.gluon_rows_wanted({"gluon": (1,)}, l, w)
        with pytest.raises(RuntimeError, match="gluon=True, but the Gluon kernels cannot run: it runs on CUDA GPUs only"):
            _check_fp32(ts, ids, gy, "silu", False, False,
                        backend=TritonBackend.Config(dw="grouped_mm", gluon=True))

    @pytest.mark.parametrize("retain,inplace", [(False, True), (True, True), (False, False)])
    def test_inplace_dgrad_only_when_the_graph_is_freed(retain, inplace):
        """A plain backward writes dH over the saved pre-activation (one saved tensor changes);
        with retain_graph=True, or ``inplace_dgrad=False``, nothing saved is touched (and a
        second backward repeats the first exactly)."""
        ts, ids, gy = _inputs(14, 16, 8, 4, 2, True, bias=True, seed=9)
        x, w1, w2, b1, b2, wts = [t.float().requires_grad_(True) for t in ts]
        saved = []

        def pack(t):
            saved.append((t, t.detach().clone()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = moe_experts(x, w1, w2, ids, wts, activation="silu", gate_up_proj_bias=b1,
                            down_proj_bias=b2, backend=TritonBackend.Config(inplace_dgrad=inplace))
        first = torch.autograd.grad(y, [x, w1, w2, wts], gy.float(), retain_graph=retain)
        changed = [t.shape for t, before in saved if not torch.equal(t, before)]
        if not inplace:
            assert changed == []
        elif retain:
            assert changed == []
            second = torch.autograd.grad(y, [x, w1, w2, wts], gy.float())
            for a, b in zip(first, second):
                assert torch.equal(a, b)
        else:
            assert changed == [torch.Size([28, 16])]  # h [T*K, 2F]

    @pytest.mark.parametrize("act,gated,bias,woi", [("silu", True, True, False), ("relu2", False, False, True),
                                                   ("gpt_oss", True, True, False)])
    @pytest.mark.parametrize("dgrad", ["fused", "split"])
    def test_recomputed_activation(act, gated, bias, woi, dgrad):
        """recompute_act=True: the forward keeps only h (not the activated rows) and the dgrad
        step recomputes act(h) for dW_down (the split pass stores it times the routing weight,
        and dW_down then reads it unscaled); every grad still matches the float64 loop."""
        from moekit.ops.triton import backward

        assert backward.recompute_activation("fused", True) and not backward.recompute_activation("split", False)
        # None (auto): wherever the dgrad is split, not with the fused dgrad kernel
        assert backward.recompute_activation("split", None) and backward.recompute_activation("grouped_mm", None)
        assert not backward.recompute_activation("fused", None)
        assert backward.activation_prescaled(dgrad, woi) == (dgrad == "split" and not woi)
        ts, ids, gy = _inputs(23, 24, 20, 5, 2, gated, bias=bias, seed=31,
                              scale=6.0 if act == "gpt_oss" else 1.0)
        _check_fp32(ts, ids, gy, act, woi, bias,
                    backend=TritonBackend.Config(recompute_act=True, dgrad=dgrad))
        # the saved tensors: [N, F] activated rows only without recompute
        F = 20
        for recompute in (True, False):
            leaves = [None if t is None else t.float().requires_grad_(True) for t in ts]
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                moe_experts(leaves[0], leaves[1], leaves[2], ids, leaves[5], activation=act,
                            gate_up_proj_bias=leaves[3], down_proj_bias=leaves[4], weight_on_input=woi,
                            backend=TritonBackend.Config(recompute_act=recompute, dgrad=dgrad))
            if gated:  # (a non-gated h is [N, F] too)
                assert any(t.shape == (46, F) for t in saved) == (not recompute)

    def test_zero_empty_experts_kernel_strides_over_large_experts():
        """Only experts without rows are zeroed, all of their elements, also when an expert has
        more elements than the fixed grid covers in one pass."""
        from moekit.ops.triton import kernels_bwd

        dw = torch.randn(3, 40, 50)
        before = dw.clone()
        counts = torch.tensor([0, 5, 0], dtype=torch.int32)
        kernels_bwd.zero_empty_experts_kernel[(4, 3)](dw, counts, 2000, BLOCK=16)  # 4*16 per pass
        assert torch.count_nonzero(dw[0]) == 0 and torch.count_nonzero(dw[2]) == 0
        assert torch.equal(dw[1], before[1])

    @pytest.mark.parametrize("recompute", ["0", "1"])
    def test_activation_checkpointing(recompute):
        """Under torch.utils.checkpoint (non-reentrant: the forward is recomputed in the
        backward and its saved tensors are the recomputed ones, which the in-place dgrad then
        overwrites) every grad equals the plain triton run's."""
        from torch.utils.checkpoint import checkpoint

        backend = TritonBackend.Config(recompute_act=recompute == "1")
        ts, ids, gy = _inputs(19, 16, 12, 4, 2, True, bias=True, seed=41)

        def f(x, w1, w2, b1, b2, wts):
            return moe_experts(x, w1, w2, ids, wts, activation="silu", gate_up_proj_bias=b1,
                               down_proj_bias=b2, backend=backend)

        grads = []
        for use_ckpt in (False, True):
            leaves = [t.float().requires_grad_(True) for t in ts]
            y = checkpoint(f, *leaves, use_reentrant=False) if use_ckpt else f(*leaves)
            grads.append(torch.autograd.grad(y, leaves, gy.float()))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    @pytest.mark.parametrize("T,K,bias,woi,dropped", [
        (1, 2, True, False, False),  # decode: one token
        (3, 3, True, False, False),  # several tokens, K not a power of two
        (2, 3, False, True, False),  # weight on the input
        (5, 2, True, False, True),  # capacity drops: dropped slots add nothing
    ])
    def test_fused_decode_down_combine(monkeypatch, T, K, bias, woi, dropped):
        """Inference at few tokens runs down + combine as one kernel (counted): the output
        matches the float64 loop in fp32, and the unfused kernels' output."""
        from moekit.ops.triton import decode

        calls = []
        real = decode.down_combine
        monkeypatch.setattr(decode, "down_combine", lambda *a: calls.append(1) or real(*a))
        ts, ids, _ = _inputs(T, 40, 24, 6, K, True, bias=bias, seed=50 + T)
        plan = make_plan(ids, 6, capacity_factor=0.5) if dropped else None
        if dropped:
            assert int(plan.num_dropped) > 0
        x, w1, w2, b1, b2, wts = [None if t is None else t for t in ts]

        pdls = []
        real_pdl = decode.use_pdl
        monkeypatch.setattr(decode, "use_pdl", lambda d, e: pdls.append(e) or real_pdl(d, e))

        def run(dtype, backend="loop"):
            c = [None if t is None else t.to(dtype) for t in (x, w1, w2, b1, b2, wts)]
            return moe_experts(c[0], c[1], c[2], ids, c[5], activation="silu", gate_up_proj_bias=c[3],
                               down_proj_bias=c[4], backend=backend, weight_on_input=woi, plan=plan)

        truth = run(torch.float64)
        unfused = run(torch.float32, TritonBackend.Config(fused_decode_tokens=0))
        assert not calls
        fused = run(torch.float32, TritonBackend.Config(fused_decode_tokens=8, pdl=False))
        assert calls == [1] and pdls == [False]  # the pdl setting reaches its launcher
        run(torch.float32, TritonBackend.Config(fused_decode_tokens=8))
        assert pdls == [False, True]
        s = max(1.0, truth.abs().max().item())
        assert (fused.double() - truth).abs().max().item() <= 2e-5 * s
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5 * s)

    @pytest.mark.parametrize("T,K,E,dups", [(1, 8, 128, False), (3, 2, 5, True), (64, 8, 128, False),
                                            (128, 8, 300, True), (7, 1, 4, True), (5, 3, 1, True)])
    def test_small_plan_equals_make_plan(T, K, E, dups):
        """The one-launch decode plan equals make_plan's torch plan field by field (ids with
        repeats too: the sort is stable either way)."""
        from moekit.ops.triton import decode

        g = torch.Generator().manual_seed(T * 1000 + K * 10 + E)
        if dups:
            ids = torch.randint(0, E, (T, K), generator=g)
        else:
            ids = torch.randn(T, E, generator=g).topk(K, dim=-1).indices
        for dtype in (torch.int64, torch.int32):
            fast = decode.small_plan(ids.to(dtype), E)
            ref = make_plan(ids.to(dtype), E)
            for f in ("sorted_slots_N", "token_ids_N", "expert_ids_N", "counts_E", "offsets_E",
                      "inverse_TK", "num_dropped"):
                a, b = getattr(fast, f), getattr(ref, f)
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f
            assert (fast.num_tokens, fast.top_k, fast.num_experts, fast.capacity) == (T, K, E, None)

    def test_small_plan_rejects_bad_ids_and_sizes():
        from moekit.ops.triton import decode

        with pytest.raises(RuntimeError, match="out of"):
            decode.small_plan(torch.tensor([[0, 4]]), 4)
        with pytest.raises(RuntimeError, match="out of"):
            decode.small_plan(torch.tensor([[-1, 2]]), 4)
        with pytest.raises(ValueError, match="slots"):
            decode.small_plan(torch.zeros(200, 8, dtype=torch.int64), 4)

    @pytest.mark.parametrize("act,gated,bias,woi", [("silu", True, True, False), ("relu2", False, False, True),
                                                   ("gpt_oss", True, True, False), ("gelu", False, True, False)])
    @pytest.mark.parametrize("recompute", ["0", "1"])
    def test_split_dgrad(monkeypatch, act, gated, bias, woi, recompute):
        """dgrad="split" (gather GEMM, then the activation backward over whole rows): the split
        kernels run, and every grad matches the float64 loop, with and without the recomputed
        activation."""
        from moekit.ops.triton import backward

        calls = []
        real = backward._down_dgrad_split
        monkeypatch.setattr(backward, "_down_dgrad_split", lambda *a: calls.append(1) or real(*a))
        ts, ids, gy = _inputs(23, 24, 20, 5, 2, gated, bias=bias, seed=71,
                              scale=6.0 if act == "gpt_oss" else 1.0)
        ids[ids == 1] = 3  # an expert without rows
        _check_fp32(ts, ids, gy, act, woi, bias,
                    backend=TritonBackend.Config(dgrad="split", recompute_act=recompute == "1"))
        assert calls == [1]

    def test_dgrad_setting_picks_the_kernel(monkeypatch):
        from moekit.ops.triton import backward

        with pytest.raises(ValueError, match="allowed: \\('auto', 'fused', 'split', 'grouped_mm'\\)"):
            backward.dgrad_mode(768, False, "both")
        assert backward.dgrad_mode(768, False) == backward.dgrad_mode(14336, False) == "split"
        assert backward.dgrad_mode(2880, False) == "fused"
        assert backward.dgrad_mode(2880, True) == backward.dgrad_mode(768, True) == "grouped_mm"
        assert backward.dgrad_mode(768, True, "fused") == "fused"
        assert backward.dgrad_mode(2880, False, "split") == "split"
        calls = []
        real = backward._down_dgrad_split
        monkeypatch.setattr(backward, "_down_dgrad_split", lambda *a: calls.append(1) or real(*a))
        ts, ids, gy = _inputs(9, 16, 8, 3, 2, True, bias=False, seed=72)
        _run(TritonBackend.Config(dgrad="fused"), ts, ids, gy, torch.float32, "silu", False)
        assert calls == []

    @pytest.mark.parametrize("bias", [False, True])
    def test_saved_row_indices(bias):
        """The forward keeps one [N] int64 row vector (the tokens), plus the rows' experts only
        when the down bias needs them (the split dgrad's routing-weight-grad term)."""
        ts, ids, _ = _inputs(10, 16, 8, 4, 2, True, bias=bias, seed=81)
        leaves = [None if t is None else t.float().requires_grad_(True) for t in ts]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            moe_experts(leaves[0], leaves[1], leaves[2], ids, leaves[5], activation="silu",
                        gate_up_proj_bias=leaves[3], down_proj_bias=leaves[4], backend="triton")
        rows = [t for t in saved if t.dtype == torch.int64 and t.shape == (20,)]
        assert len(rows) == (2 if bias else 1)

    @pytest.mark.parametrize("case", ["bias", "woi", "empty-experts", "one-expert", "t1"])
    def test_weight_grads_odd_routings(case):
        """The weight-grad kernel (source rows loaded one block ahead) gives every grad of the
        float64 loop whatever the routing: experts with no rows get zeros, one expert with all
        rows, a single token, rows not a multiple of the block."""
        T = 1 if case == "t1" else 23
        ids = torch.full((T, 2), 2) if case == "one-expert" else None
        if ids is not None:
            ids[:, 1] = 4
        ts, ids, gy = _inputs(T, 40, 24, 6, 2, True, bias=case != "woi", seed=57, ids=ids)
        if case == "empty-experts":
            ids[ids == 1] = 0
            ids[ids == 3] = 5
        _check_fp32(ts, ids, gy, "silu", case == "woi", case != "woi")

    @pytest.mark.parametrize("act", ["gpt_oss(alpha=1.25,limit=3.0)", "silu(limit=2.0)"])
    def test_parametrised_activations(monkeypatch, act):
        """Activations with parameters on the triton backend: GPT-OSS's clamped GLU with other
        constants runs the fused kernels (the constants are kernel arguments), a clamped
        SwiGLU the staged path over the triton grouped linear; both equal the float64 loop."""
        import moekit.ops.triton as triton_pkg

        calls = []
        real = triton_pkg.fused_experts
        monkeypatch.setattr(triton_pkg, "fused_experts",
                            lambda *a, **k: calls.append(k.get("limit")) or real(*a, **k))
        ts, ids, gy = _inputs(17, 24, 20, 5, 2, True, bias=True, seed=95, scale=3.0)
        truth = _run("loop", ts, ids, gy, torch.float64, act, False)
        fast = _run("triton", ts, ids, gy, torch.float32, act, False)
        for name, a, t in zip(_names(True), fast, truth):
            err, s = _max_err(a, t), _scale(t)
            assert err <= 2e-5 * s, f"{name}: max err {err:.3e}"
        assert calls == ([3.0] if act.startswith("gpt_oss") else [])

    def _gpt_oss_ref(x, w1, w2, b1, b2, ids, wts, alpha, limit):
        """float64 GPT-OSS experts on interleaved ``w1 [E, 2F, D]``, written out per slot."""
        h = torch.einsum("td,tkhd->tkh", x, w1[ids]) + b1[ids]
        g, u = h[..., 0::2].clamp(max=limit), h[..., 1::2].clamp(-limit, limit)
        a = (u + 1) * g * torch.sigmoid(alpha * g)
        y = torch.einsum("tkf,tkdf->tkd", a, w2[ids]) + b2[ids]
        return (y * wts[..., None]).sum(1)

    @pytest.mark.parametrize("mode", ["fused", "split", "recompute", "grouped_mm", "inference",
                                      "grouped_mm-inference"])
    def test_transposed_weights_and_glu_constants(mode):
        """transformers' GPT-OSS layout: both weights stored ``(in, out)`` and passed as
        transposed views, gate/up interleaved, with swiglu_alpha/limit other than GPT-OSS's.
        The output and every grad equal the float64 reference, and the weights' grads come back
        in the parameters' own (contiguous) layout."""
        from moekit.ops.triton import fused_experts

        # grouped_mm: the large experts' path (dgrad GEMM, dX and dW on grouped_mm)
        settings = TritonBackend.Config(
            dgrad={"split": "split", "grouped_mm": "auto"}.get(mode, "fused"),
            recompute_act=mode == "recompute", dw="grouped_mm" if "grouped_mm" in mode else "auto")
        inference = mode.endswith("inference")
        T = 1 if mode == "inference" else 19
        alpha, limit = 1.25, 3.0
        ts, ids, gy = _inputs(T, 24, 20, 5, 2, True, bias=True, seed=93, scale=3.0)
        x, w1, w2, b1, b2, wts = ts
        w1, b1 = interleave_gate_up(w1), interleave_gate_up(b1)
        params = [x, w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous(), b1, b2, wts]
        truth_leaves = [t.clone().requires_grad_(True) for t in params]
        tx, tw1, tw2, tb1, tb2, twts = truth_leaves
        truth = _gpt_oss_ref(tx, tw1.transpose(1, 2), tw2.transpose(1, 2), tb1, tb2, ids, twts,
                             alpha, limit)
        leaves = [t.float().requires_grad_(not inference) for t in params]
        fx, fw1, fw2, fb1, fb2, fwts = leaves
        y = fused_experts(fx, fw1.transpose(1, 2), fw2.transpose(1, 2), make_plan(ids, 5), fwts,
                          activation="gpt_oss", gated=True, gate_up_proj_bias=fb1,
                          down_proj_bias=fb2, gate_up_interleaved=True, settings=settings,
                          alpha=alpha, limit=limit)
        assert _max_err(y.detach(), truth.detach()) <= 2e-5 * _scale(truth)
        if inference:
            return
        got = torch.autograd.grad(y, leaves, gy.float())
        want = torch.autograd.grad(truth, truth_leaves, gy)
        for name, a, t in zip(["dx", "dw_up", "dw_down", "db_up", "db_down", "dtopk"], got, want):
            err, s = _max_err(a, t), _scale(t)
            assert err <= 2e-5 * s, f"{name}: max err {err:.3e}"
        assert got[1].is_contiguous() and got[2].is_contiguous()

    @pytest.mark.parametrize("act", ["gpt_oss", "silu"])
    @pytest.mark.parametrize("mode", ["fused", "split", "recompute", "inference"])
    def test_interleaved_gate_up(act, mode):
        """GPT-OSS's interleaved gate/up layout in the fused kernels: the output and every grad
        equal the float64 loop on the concatenated layout (weight grads come back interleaved),
        through either dgrad, with the recomputed activation, and in the inference path (T=1:
        the fused decode kernel)."""
        backend = TritonBackend.Config(dgrad="split" if mode == "split" else "fused",
                                       recompute_act=mode == "recompute")
        T = 1 if mode == "inference" else 19
        ts, ids, gy = _inputs(T, 24, 20, 5, 2, True, bias=True, seed=91, scale=6.0)
        truth = _run("loop", ts, ids, gy, torch.float64, act, False)
        x, w1, w2, b1, b2, wts = [t.float() for t in ts]
        leaves = [t.requires_grad_(mode != "inference") for t in
                  (x, interleave_gate_up(w1), w2, interleave_gate_up(b1), b2, wts)]
        y = moe_experts(leaves[0], leaves[1], leaves[2], ids, leaves[5], activation=act,
                        gate_up_proj_bias=leaves[3], down_proj_bias=leaves[4], backend=backend,
                        gate_up_interleaved=True)
        got = [y.detach()]
        if mode != "inference":
            got += list(torch.autograd.grad(y, leaves, gy.float()))
            got[2], got[4] = deinterleave_gate_up(got[2]), deinterleave_gate_up(got[4])  # back to [gate | up]
        names = ["y", "dx", "dw_up", "dw_down", "db_up", "db_down", "dtopk"]
        for name, a, t in zip(names, got, truth):
            err, s = _max_err(a, t), _scale(t)
            assert err <= 2e-5 * s, f"{name}: max err {err:.3e}"

    @pytest.mark.parametrize("dw", ["triton", "grouped_mm"])
    def test_grouped_linear_vs_loop(dw):
        """The triton backend's staged grouped linear (rows_gemm forward; dX by rows_gemm on the
        transposed weights, dW and the bias grad by their kernels, or torch grouped_mm with
        dw="grouped_mm"): output and every grad equal the float64 loop, with an expert that
        has no rows and one with a single row."""
        from moekit.ops import LoopBackend

        g = torch.Generator().manual_seed(3)
        E, I, O = 4, 12, 10
        ids = torch.tensor([[0], [2], [0], [3], [2], [0], [2]])  # expert 1: no rows, 3: one row
        plan = make_plan(ids, E)
        N = plan.num_rows
        x, w, b, gy = (torch.randn(N, I, generator=g, dtype=torch.float64),
                       torch.randn(E, O, I, generator=g, dtype=torch.float64),
                       torch.randn(E, O, generator=g, dtype=torch.float64),
                       torch.randn(N, O, generator=g, dtype=torch.float64))

        def run(backend, dtype):
            leaves = [t.to(dtype).requires_grad_(True) for t in (x, w, b)]
            y = backend.grouped_linear(leaves[0], leaves[1], plan, leaves[2])
            return [y.detach()] + list(torch.autograd.grad(y, leaves, gy.to(dtype)))

        truth = run(LoopBackend(), torch.float64)
        fast = run(TritonBackend.Config(dw=dw).build(), torch.float32)
        for name, a, t in zip(["y", "dx", "dw", "db"], fast, truth):
            assert a.dtype == torch.float32 and a.shape == t.shape, name
            assert _max_err(a, t) <= 2e-5 * _scale(t), name
        assert torch.count_nonzero(fast[2][1]) == 0 and torch.count_nonzero(fast[3][1]) == 0

    def test_staged_stages_run_the_triton_grouped_linear(monkeypatch):
        """expert_up / expert_down with backend="triton" run its Triton grouped linear (no
        silent fall-back to another backend)."""
        from moekit.ops import expert_down, expert_up, permute
        from moekit.ops.triton import grouped_linear

        calls = []
        real = grouped_linear.GroupedLinear.apply
        monkeypatch.setattr(grouped_linear.GroupedLinear, "apply", lambda *a: calls.append(1) or real(*a))
        ts, ids, _ = _inputs(6, 16, 8, 3, 2, True, bias=True, seed=4)
        x, w1, w2, b1, b2, _ = [t.float() for t in ts]
        plan = make_plan(ids, 3)
        x_ND = permute(x, plan)
        y = expert_down(expert_up(x_ND, w1, plan, bias_EH=b1, backend="triton"), w2, plan,
                        bias_ED=b2, backend="triton")
        ref = expert_down(expert_up(x_ND, w1, plan, bias_EH=b1, backend="loop"), w2, plan,
                          bias_ED=b2, backend="loop")
        assert calls == [1, 1]
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)

    def test_tile_settings_reach_every_launcher(monkeypatch):
        """gemm_tile, kind_tiles, dw_tile and down_combine_tile travel from the config through
        the fused call, the custom ops and the autograd function to every config-picking
        launcher (forward, backward, fused decode and the staged grouped linear)."""
        from moekit.ops.triton import decode, launch_config
        from moekit.ops.triton_backend import DownCombineTile, GemmTile, parse_tiles

        cfg = TritonBackend.Config(gemm_tile=GemmTile(64, 128, 32, 4, 2), kind_tiles={"rows": (32, 64, 64, 2, 2)},
                                   dw_tile=GemmTile(32, 32, 16, 2, 2), down_combine_tile=DownCombineTile(8, 32))
        want = parse_tiles(cfg.tiles_spec())
        assert set(want) == {"gemm", "rows", "dw", "down_combine"}
        seen = []
        for name in ("_gemm_config", "_dw_config"):
            real = getattr(launch_config, name)
            monkeypatch.setattr(launch_config, name, lambda *a, _r=real, _n=name: seen.append((_n, a[-1])) or _r(*a))
        real_dc = decode.down_combine
        monkeypatch.setattr(decode, "down_combine", lambda *a: seen.append(("down_combine", a[-1])) or real_dc(*a))
        backend = cfg.build()
        ts, ids, gy = _inputs(5, 16, 8, 3, 2, True, bias=False, seed=8)
        _run(backend, ts, ids, gy, torch.float32, "silu", False)  # forward + backward
        x, w1, w2, _, _, wts = [None if t is None else t.float() for t in ts]
        with torch.no_grad():  # fused decode (T=1)
            moe_experts(x[:1], w1, w2, ids[:1], wts[:1], backend=backend)
        plan = make_plan(ids, 3)
        xr = torch.randn(plan.num_rows, 16, requires_grad=True)
        backend.grouped_linear(xr, w1.requires_grad_(), plan).sum().backward()  # staged
        kinds = {n for n, _ in seen}
        assert kinds == {"_gemm_config", "_dw_config", "down_combine"}, kinds
        assert all(t == want for _, t in seen), seen

    def test_layer_with_the_triton_backend_copies_and_pickles():
        """A GroupedExperts that has run on the triton backend (its resolved backend cached)
        deep-copies and pickles, and the copy computes the same."""
        import copy
        import io

        from moekit import GroupedExperts

        ex = GroupedExperts.Config(backend=TritonBackend.Config(fused_decode_tokens=0)).build(
            dim=16, hidden_dim=8, num_experts=4)
        x, ids, w = torch.randn(3, 16), torch.tensor([[0, 1], [2, 1], [3, 0]]), torch.rand(3, 2)
        y = ex(x, ids, w)
        twin = copy.deepcopy(ex)
        torch.save(twin, io.BytesIO())
        assert torch.equal(twin(x, ids, w), y)
        assert isinstance(twin.backend_for(x.device, x.dtype), TritonBackend)

    class _Counted:
        """A kernel whose launches (``kernel[grid](...)``) are counted in ``calls``."""

        def __init__(self, kernel, calls, name):
            self.kernel, self.calls, self.name = kernel, calls, name

        def __getitem__(self, grid):
            self.calls.append(self.name)
            return self.kernel[grid]

    @pytest.mark.parametrize("act,gated,bias,woi", [("silu", True, True, False), ("relu2", False, False, True),
                                                   ("gpt_oss", True, True, True)])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_tensor_descriptor_kernels(monkeypatch, act, gated, bias, woi, dtype):
        """tma=True: the up projection, the row GEMMs (the down projection, and the input grad
        through the transposed gate_up view) and the weight grads read their tiles through
        tensor descriptors (persistent or not), with the same results as the pointer kernels
        (tma=False), and fp32 within the float64 loop's tolerance."""
        from moekit.ops.triton import launchers

        calls = []
        for name in ("up_tma_kernel", "rows_gemm_tma_kernel", "dw_tma_kernel"):
            monkeypatch.setattr(launchers.KT, name, _Counted(getattr(launchers.KT, name), calls, name))
        ts, ids, gy = _inputs(37, 32, 24, 5, 2, gated, bias=bias, seed=91,
                              scale=6.0 if act == "gpt_oss" else 1.0)
        ids[ids == 2] = 4  # an expert without rows
        tma = TritonBackend.Config(dgrad="split", tma=True, persistent=dtype == torch.float32,
                                   gather_x=dtype == torch.float16)
        if dtype == torch.float32:
            _check_fp32(ts, ids, gy, act, woi, bias, backend=tma)
        else:
            fast = _run(tma, ts, ids, gy, dtype, act, woi)
            plain = _run(TritonBackend.Config(dgrad="split", tma=False), ts, ids, gy, dtype, act, woi)
            for name, a, p in zip(_names(bias), fast, plain):
                torch.testing.assert_close(a, p, rtol=2e-3, atol=2e-3, msg=name)
        assert "up_tma_kernel" in calls and calls.count("rows_gemm_tma_kernel") >= 2, calls
        # the weight grads with one operand gathered and neither scaled (the routing weight on
        # the input scales x's rows)
        assert calls.count("dw_tma_kernel") == (1 if woi else 2), calls

    @pytest.mark.parametrize("gated,woi", [(True, False), (False, True)])
    def test_up_projection_on_gathered_rows(monkeypatch, gated, woi):
        """gather_x: the TMA up projection reads x's rows gathered beforehand (one gather_rows
        call, counted) through a descriptor, with the same bits as the gather in its prologue;
        by default only where the output is at least GATHER_X_MIN_COLS wide."""
        from moekit.ops.triton import launch_config, launchers

        calls = []
        real = launchers.gather_rows
        monkeypatch.setattr(launchers, "gather_rows", lambda *a: calls.append(1) or real(*a))
        g = torch.Generator().manual_seed(6)
        T, D, F, E, K = 29, 32, 24, 4, 2
        H = 2 * F if gated else F
        x, w, b = (torch.randn(T, D, generator=g), torch.randn(E, H, D, generator=g),
                   torch.randn(E, H, generator=g))
        plan = make_plan(torch.randn(T, E, generator=g).topk(K, -1).indices, E)
        roww = torch.rand(plan.num_rows, generator=g) if woi else None
        args = (x, w, b, plan.token_ids_N, roww, plan.counts_E, plan.offsets_E, "silu", gated)
        h0, a0 = launchers.up_forward(*args, tiles={"tma": (1,), "gather_x": (0,)})
        assert not calls
        launchers.up_forward(*args, tiles={"tma": (1,)})  # 24 columns: no gather by default
        assert not calls
        h1, a1 = launchers.up_forward(*args, tiles={"tma": (1,), "gather_x": (1,)})
        assert calls == [1]
        assert torch.equal(h1, h0) and torch.equal(a1, a0)
        monkeypatch.setattr(launch_config, "GATHER_X_MIN_COLS", F)
        launchers.up_forward(*args, tiles={"tma": (1,)})
        assert calls == [1, 1]

    @pytest.mark.parametrize("gated", [True, False])
    def test_tensor_descriptors_on_transposed_weights(gated):
        """A weight stored transposed (``[E, D, H]`` seen as ``[E, H, D]``): the descriptor
        covers the stored layout and the tile is transposed for the MMA; the same values as
        the pointer kernel."""
        from moekit.ops.triton import launchers

        g = torch.Generator().manual_seed(5)
        T, D, F, E, K = 29, 32, 24, 4, 2
        H = 2 * F if gated else F
        x = torch.randn(T, D, generator=g)
        w = torch.randn(E, D, H, generator=g).transpose(1, 2)  # [E, H, D], D not contiguous
        b = torch.randn(E, H, generator=g)
        plan = make_plan(torch.randn(T, E, generator=g).topk(K, -1).indices, E)
        args = (x, w, b, plan.token_ids_N, None, plan.counts_E, plan.offsets_E, "silu", gated)
        h0, a0 = launchers.up_forward(*args, tiles={"tma": (0,)})
        h1, a1 = launchers.up_forward(*args, tiles={"tma": (1,)})
        torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a1, a0, rtol=1e-5, atol=1e-5)
        ref = torch.stack([x[t] @ w[e].T + b[e] for t, e in zip(plan.token_ids_N.tolist(),
                                                               plan.expert_ids_N.tolist())])
        torch.testing.assert_close(h1, ref, rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("act,gated,bias,dgrad,cap", [("silu", True, True, "auto", None),
                                                          ("silu", True, False, "split", 4),
                                                          ("relu2", False, True, "auto", None),
                                                          ("gpt_oss", True, True, "split", 3)])
    def test_chunk_runner_equals_the_loop(act, gated, bias, dgrad, cap):
        """The triton chunk runner (expert parallelism's local compute): three chunks, each the
        rows of one group of experts (one group with no rows), forward and input grads per chunk,
        the weight grads once over every chunk's rows: equal to the float64 loop over all rows
        (dropless: the row GEMMs write the rows back in order; with a capacity: through the
        combine)."""
        from moekit.ops.triton.chunked import TritonChunks

        R, D, F, L = 31, 24, 20, 6
        groups = [(0, 2), (2, 4), (4, 6)]
        ts, _, _ = _inputs(R, D, F, L, 1, gated, bias=bias, seed=13, scale=6.0 if act == "gpt_oss" else 1.0)
        x, w1, w2, b1, b2 = ts[:5]
        g = torch.Generator().manual_seed(14)
        ids = torch.randint(0, 4, (R,), generator=g)  # experts 4, 5: no rows
        ids[:3] = 1  # one group with rows of only one expert
        order = torch.argsort(torch.div(ids, 2, rounding_mode="floor"), stable=True)  # chunk-major rows
        x, ids = x[order], ids[order]
        gy = torch.randn(R, D, generator=g, dtype=torch.float64)
        leaves = [None if t is None else t.detach().requires_grad_() for t in (x, w1, w2, b1, b2)]
        y = moe_experts(leaves[0], *leaves[1:3], ids.view(R, 1), torch.ones(R, 1, dtype=torch.float64),
                        activation=act, gate_up_proj_bias=leaves[3], down_proj_bias=leaves[4], backend="loop",
                        plan=make_plan(ids.view(R, 1), L, capacity=cap))
        live = [t for t in leaves if t is not None]
        truth = [y.detach(), *torch.autograd.grad(y, live, gy)]

        f32 = [None if t is None else t.float() for t in (x, w1, w2, b1, b2)]
        backend = TritonBackend(TritonBackend.Config(dgrad=dgrad))
        run = backend.chunk_runner(f32[1:], activation=act, train=True, total_rows=R)
        assert isinstance(run, TritonChunks)
        ys, dxs, at = [], [], 0
        for c, (lo, hi) in enumerate(groups):
            n = int(((ids >= lo) & (ids < hi)).sum())
            rows = slice(at, at + n)
            ys.append(run.forward(c, f32[0][rows], (ids[rows] - lo).view(n, 1), lo, hi, base=at,
                                  capacity=cap))
            at += n
        at = 0
        for c, (lo, hi) in enumerate(groups):
            n = ys[c].shape[0]
            dxs.append(run.backward(c, gy[at:at + n].float()))
            at += n
        dws = run.weight_grads(f32[0], gy.float())
        fast = [torch.cat(ys), torch.cat(dxs)] + [d for d in dws if d is not None]
        for name, a, t in zip(["y", "dx", "dw_up", "dw_down", "db_up", "db_down"], fast, truth):
            assert a.shape == t.shape, name
            err, s = _max_err(a, t), _scale(t)
            assert err <= 2e-5 * s, f"{name}: max err {err:.3e}"

    @pytest.mark.parametrize("weights", [False, True])
    @pytest.mark.parametrize("capacity", [None, 3])
    def test_permute_unpermute_stages(weights, capacity):
        """TritonBackend.permute/unpermute (one gather pass; the combine kernel) equal the
        PyTorch stages, forward and every grad (x, the rows, the routing weights), with dropped
        slots too."""
        from moekit.ops.stages import permute, unpermute

        g = torch.Generator().manual_seed(3)
        T, D, E, K = 19, 40, 5, 3
        ids = torch.randn(T, E, generator=g).topk(K, -1).indices
        plan = make_plan(ids, E, capacity=capacity)
        x = torch.randn(T, D, generator=g, dtype=torch.float64)
        w = torch.rand(T, K, generator=g, dtype=torch.float64) if weights else None
        y = torch.randn(plan.num_rows, D, generator=g, dtype=torch.float64)
        gx = torch.randn(plan.num_rows, D, generator=g, dtype=torch.float64)
        gy = torch.randn(T, D, generator=g, dtype=torch.float64)
        tb = TritonBackend()
        for stage, fast, src, grad in ((permute, tb.permute, x, gx), (unpermute, tb.unpermute, y, gy)):
            res = []
            for fn, dt in ((stage, torch.float64), (fast, torch.float32)):
                a = src.to(dt).requires_grad_()
                ww = None if w is None else w.to(dt).requires_grad_()
                out = fn(a, plan, ww)
                live = [a] + ([ww] if ww is not None else [])
                res.append([out.detach(), *torch.autograd.grad(out, live, grad.to(dt))])
            for name, f, t in zip(["out", "d_in", "d_weights"], res[1], res[0]):
                assert f.shape == t.shape, (stage.__name__, name)
                assert _max_err(f, t) <= 2e-5 * _scale(t), (stage.__name__, name, _max_err(f, t))
