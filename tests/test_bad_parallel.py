"""Bad input on one rank of an expert-parallel layer: every rank raises, nobody hangs.

One group of 2 gloo processes (started once, collectives time out after 30 s) runs every
case in turn: rank 1 (or both ranks) get a bad input, rank 0 a good one. Each case asserts
the error type and a phrase of the message on every rank; after all the failures a good
forward on both ranks must still equal the single-process layer (the group stays in step).
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit import MoE, TokenChoiceTopKRouter
from moekit.parallel import apply_ep
from moekit.parallel.checks import RankInputError
from moekit.parallel.ep import EXCHANGES

from test_parallel import _free_port

D, F, E, K = 8, 16, 4, 2


def _moe():
    torch.manual_seed(0)
    return MoE.Config(dim=D, hidden_dim=F, num_experts=E,
                      router=TokenChoiceTopKRouter.Config(top_k=K)).build()


def _good(T=5, seed=0):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


# id -> (what rank 1 passes as (x, kwargs), whether rank 0 is bad too)
BAD = {
    "wrong-dim": lambda: (torch.randn(5, D + 1), {}),
    "1-d-x": lambda: (torch.randn(D), {}),
    "4-d-x": lambda: (torch.randn(1, 1, 5, D), {}),
    "int-x": lambda: (torch.ones(5, D, dtype=torch.int64), {}),
    "float64-x": lambda: (torch.randn(5, D, dtype=torch.float64), {}),
    "not-a-tensor": lambda: ([[0.0] * D] * 5, {}),
    "mask-length": lambda: (_good(), {"token_mask": torch.ones(4, dtype=torch.bool)}),
    "router-logits-shape": lambda: (_good(), {"router_logits": torch.randn(5, E + 1)}),
    "router-logits-int": lambda: (_good(), {"router_logits": torch.ones(5, E, dtype=torch.int64)}),
}
# id -> (error type on rank 1, phrase on rank 1); rank 0 raises RankInputError naming rank 1
EXPECT = {
    "wrong-dim": (ValueError, "MoE input must be"),
    "1-d-x": (ValueError, "MoE input must be"),
    "4-d-x": (ValueError, "MoE input must be"),
    "int-x": (TypeError, "floating"),
    "float64-x": (TypeError, "dtype torch.float64"),
    "not-a-tensor": (TypeError, "must be a tensor"),
    "mask-length": (ValueError, "token_mask has 4 entries"),
    "router-logits-shape": (ValueError, "router_logits must be"),
    "router-logits-int": (TypeError, "router_logits must be a floating"),
}


def _run_cases(rank, out_path):
    results = {}
    for exchange in EXCHANGES:
        results[exchange] = _cases(rank, exchange)
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(results, f)


def _cases(rank, exchange):
    moe = _moe()
    ref = copy.deepcopy(moe)
    apply_ep(moe, exchange=exchange)
    results = {}
    for name, make in BAD.items():
        x, kw = make() if rank == 1 else (_good(), {})
        try:
            moe(x, **kw)
            results[name] = ["no error", ""]
        except Exception as e:  # noqa: BLE001 - recorded and checked by the test
            results[name] = [type(e).__name__, str(e)]
    # both ranks bad: each raises its own error
    try:
        moe(torch.randn(5, D + rank + 1))
        results["both-bad"] = ["no error", ""]
    except Exception as e:  # noqa: BLE001
        results["both-bad"] = [type(e).__name__, str(e)]
    # then a good forward on both ranks equals the single-process layer on all tokens
    xs = [_good(5, 1), _good(3, 2)]
    y = moe(xs[rank])
    y_ref = ref(torch.cat(xs))
    a = 0 if rank == 0 else 5
    results["good-after-errors"] = ["max_abs_err", float((y - y_ref[a:a + xs[rank].shape[0]]).abs().max())]
    # a rank with no tokens still gets the right (empty) output
    y0 = moe(xs[0] if rank == 0 else torch.randn(0, D))
    results["empty-rank"] = ["shape", list(y0.shape)]
    return results


def _worker(rank, world, port, out_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        _run_cases(rank, out_path)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ep_bad") / "res")
    ctx = mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=False)
    t0 = time.time()
    while not ctx.join(timeout=1):
        if time.time() - t0 > 120:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("the 2-process group did not finish in 120 s (a hang on bad input?)")
    return [json.load(open(f"{out}.{r}")) for r in range(2)]


@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_on_one_rank_raises_on_every_rank(results, case, exchange):
    err_type, phrase = EXPECT[case]
    kind1, msg1 = results[1][exchange][case]
    assert kind1 == err_type.__name__ and phrase in msg1, (kind1, msg1)
    kind0, msg0 = results[0][exchange][case]
    assert kind0 == RankInputError.__name__ and "rank 1 of the group failed" in msg0, (kind0, msg0)
    assert phrase in msg0  # the good rank says what went wrong on the bad one


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_bad_input_on_both_ranks(results, exchange):
    for r in range(2):
        kind, msg = results[r][exchange]["both-bad"]
        assert kind == "ValueError" and "MoE input must be" in msg and f"{D + r + 1})" in msg, (kind, msg)


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_good_forward_after_errors_matches_one_process(results, exchange):
    for r in range(2):
        what, err = results[r][exchange]["good-after-errors"]
        assert what == "max_abs_err" and err < 1e-5, err


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_rank_without_tokens(results, exchange):
    assert results[1][exchange]["empty-rank"] == ["shape", [0, D]]
    assert results[0][exchange]["empty-rank"] == ["shape", [5, D]]


def test_apply_ep_bad_exchange_settings():
    """Bad exchange settings fail before any collective (no process group needed to see it)."""
    moe = _moe()
    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialized")
    for kw, phrase in (({"exchange": "pairs"}, "exchange='pairs'; allowed: ('rows', 'tokens')"),
                       ({"partials": "bf16"}, "partials='bf16'; allowed: ('float32', 'input')")):
        with pytest.raises(ValueError, match=re.escape(phrase)):
            apply_ep(moe, **kw)


def test_rank_input_error_is_a_value_error():
    assert issubclass(RankInputError, ValueError)
