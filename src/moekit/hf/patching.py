"""Whole-block patching: replace each sparse MoE block of a transformers model by a moekit MoE.

``patch(model)`` finds every sparse MoE block (named families by class, others by structure),
derives a :class:`moekit.MoE.Config` from the HF config (:func:`config_from_hf`), builds an
:class:`HFMoE` (a :class:`moekit.MoE` that also speaks the block's HF calling convention) whose
parameters are the block's own tensors where the layout agrees (same ``nn.Parameter`` objects,
or transposed views of the same storage) and converted copies otherwise (GPT-OSS's interleaved
gate/up), checks on a probe that it computes what the block computed, and swaps it in.
``unpatch(model)`` puts the original block objects back, carrying the current weights.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..experts import GroupedExperts
from ..moe import MoE
from ..router import TokenChoiceTopKRouter
from ..shared import SharedExperts
from .experts_impl import hf_activation_name
from .families import (
    CONCAT,
    INTERLEAVED_TRANSPOSED,
    RET_LOGITS,
    RET_TENSOR,
    RET_WEIGHTS,
    TRANSPOSED,
    FamilySpec,
    activation_of,
    hf_get,
    num_experts_of,
    routing_from_config,
    spec_for_block,
    spec_for_model_type,
    top_k_of,
)

__all__ = [
    "HFMoE", "config_from_hf", "patch", "unpatch", "block_param_map", "PatchError", "grads_by_hf_name",
]

logger = logging.getLogger(__name__)


class PatchError(ValueError):
    """A block that moekit cannot express exactly (the message names the block and why)."""


# ----------------------------------------------------------------------------- transforms
# kinds of correspondence between an HF tensor and a moekit tensor
SAME, TRANS, INTERLEAVE_T, INTERLEAVE_BIAS, FP32, FP32_ROW, ROW = (
    "same",
    "transpose",
    "interleave_t",
    "interleave_bias",
    "fp32",  # a float32 buffer in moekit, any dtype in HF
    "fp32_row",  # the same, stored [1, E] in HF (ERNIE's moe_statics)
    "row",  # [1, E] <-> [E], dtype kept (state-dict conversion of fp32_row)
)


def to_moekit(kind: str, t: torch.Tensor) -> torch.Tensor:
    if kind == SAME:
        return t
    if kind == TRANS:  # [E, I, O] -> [E, O, I] view
        return t.transpose(1, 2)
    if kind == INTERLEAVE_T:  # [E, D, 2F] gate/up columns alternating -> [E, 2F, D] gate first
        tt = t.transpose(1, 2)
        return torch.cat([tt[:, 0::2], tt[:, 1::2]], dim=1)
    if kind == INTERLEAVE_BIAS:  # [E, 2F] alternating -> gate first
        return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)
    if kind == FP32:
        return t.float()
    if kind == FP32_ROW:
        return t.reshape(-1).float()
    if kind == ROW:
        return t.reshape(-1)
    raise AssertionError(kind)


def to_hf(kind: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    if kind == SAME:
        return t
    if kind == TRANS:
        return t.transpose(1, 2)
    if kind == INTERLEAVE_T:
        E, H, D = t.shape
        f = H // 2
        return (
            torch.stack([t[:, :f], t[:, f:]], dim=2).reshape(E, H, D).transpose(1, 2).contiguous()
        )
    if kind == INTERLEAVE_BIAS:
        E, H = t.shape
        f = H // 2
        return torch.stack([t[:, :f], t[:, f:]], dim=2).reshape(E, H)
    if kind == FP32:
        return t if dtype is None else t.to(dtype)
    if kind == FP32_ROW:
        return (t if dtype is None else t.to(dtype)).reshape(1, -1)
    if kind == ROW:
        return t.reshape(1, -1)
    raise AssertionError(kind)


@dataclass(frozen=True)
class Entry:
    hf: str  # path inside the HF block
    moekit: str  # path inside the moekit MoE
    kind: str


def block_param_map(spec: FamilySpec, moe_cfg: MoE.Config) -> list[Entry]:
    """HF block tensor path <-> moekit MoE tensor path, and how one becomes the other."""
    r, e = spec.router, spec.experts
    rl = f"{r}.{spec.router_linear}" if spec.router_linear else r
    rc, ec = moe_cfg.router, moe_cfg.experts
    out = [Entry(f"{rl}.weight", "router.gate.weight", SAME)]
    if rc.use_router_bias:
        out.append(Entry(f"{rl}.bias", "router.gate.bias", SAME))
    if rc.use_expert_bias:
        eb = spec.expert_bias or f"{r}.e_score_correction_bias"
        out.append(Entry(eb, "router.expert_bias", FP32_ROW if spec.expert_bias_row else FP32))
    up = "gate_up_proj" if ec.is_gated else "up_proj"
    w_kind = {CONCAT: SAME, TRANSPOSED: TRANS, INTERLEAVED_TRANSPOSED: INTERLEAVE_T}[spec.layout]
    if spec.layout == INTERLEAVED_TRANSPOSED and not ec.is_gated:
        raise PatchError(f"{spec.name}: an interleaved gate/up layout needs gated experts")
    out.append(Entry(f"{e}.{up}", f"experts.{up}", w_kind))
    out.append(
        Entry(f"{e}.down_proj", "experts.down_proj", SAME if spec.layout == CONCAT else TRANS)
    )
    if ec.use_bias:
        b_kind = INTERLEAVE_BIAS if spec.layout == INTERLEAVED_TRANSPOSED else SAME
        out.append(Entry(f"{e}.{up}_bias", f"experts.{up}_bias", b_kind))
        out.append(Entry(f"{e}.down_proj_bias", "experts.down_proj_bias", SAME))
    if moe_cfg.shared_experts is not None:
        s = spec.shared
        names = (
            ["gate_proj", "up_proj", "down_proj"]
            if moe_cfg.shared_experts.is_gated
            else ["up_proj", "down_proj"]
        )
        out += [Entry(f"{s}.{n}.weight", f"shared_experts.{n}.weight", SAME) for n in names]
        if moe_cfg.shared_experts.use_gate:
            out.append(
                Entry(f"{spec.shared_gate}.weight", "shared_experts.expert_gate.weight", SAME)
            )
    return out


# ------------------------------------------------------------------------------ config
def _text_config(hf_config):
    get = getattr(hf_config, "get_text_config", None)
    return get() if get is not None else hf_config


def config_from_hf(
    hf_config,
    *,
    backend: str = "auto",
    spec: FamilySpec | None = None,
    _num_experts: int | None = None,
    _top_k: int | None = None,
) -> MoE.Config:
    """The :class:`moekit.MoE.Config` of one sparse block of a transformers model config.

    Named families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, Llama 4) are
    exact; other families get a guess from common attribute names (``patch`` verifies it
    against the block). Raises :class:`PatchError` naming the reason when the family's block
    cannot be expressed (e.g. router jitter noise, a non-default GPT-OSS ``swiglu_limit``).
    """
    cfg = _text_config(hf_config)
    model_type = getattr(cfg, "model_type", None)
    spec = spec or spec_for_model_type(model_type) or generic_spec_from_config(cfg)
    owner = f"{spec.name} ({type(cfg).__name__})"
    reason = spec.check(cfg)
    if reason:
        raise PatchError(f"{owner}: cannot be expressed by moekit.MoE: {reason}")
    E = _num_experts or num_experts_of(cfg)
    K = _top_k or top_k_of(cfg)
    D = cfg.hidden_size
    Fh = spec.expert_hidden(cfg)
    if E is None or K is None or Fh is None:
        raise PatchError(f"{owner}: config has no number of experts / top-k / expert hidden size")
    act = activation_of(cfg, owner)
    router = TokenChoiceTopKRouter.Config(
        top_k=int(K),
        router_dtype=torch.float32 if spec.router_in_fp32 else None,
        **spec.routing(cfg),
    )
    ekw = {"activation": act, **spec.experts_kwargs(cfg)}
    experts = GroupedExperts.Config(backend=backend, **ekw)
    shared = None
    if spec.shared is not None and spec.shared_hidden(cfg):
        shared = SharedExperts.Config(
            hidden_dim=int(spec.shared_hidden(cfg)),
            activation=act,
            use_gate=spec.shared_gate is not None,
        )
    return MoE.Config(
        dim=int(D),
        hidden_dim=int(Fh),
        num_experts=int(E),
        router=router,
        experts=experts,
        shared_experts=shared,
    )


def generic_spec_from_config(cfg) -> FamilySpec:
    """A spec for a family not in the map, from common config attribute names only."""
    routing = routing_from_config(cfg)
    shared_hidden = hf_get(cfg, "shared_expert_intermediate_size")
    if shared_hidden is None and hf_get(cfg, "n_shared_experts", "num_shared_experts"):
        n = hf_get(cfg, "n_shared_experts", "num_shared_experts")
        shared_hidden = hf_get(cfg, "moe_intermediate_size", "intermediate_size") * n
    return FamilySpec(
        name=str(getattr(cfg, "model_type", "generic")),
        model_types=(),
        block_classes=(),
        shared="shared_experts" if shared_hidden else None,
        shared_hidden=(lambda c, h=shared_hidden: h) if shared_hidden else None,
        routing=lambda c, kw=routing: dict(kw),
        router_in_fp32=bool(routing.get("num_expert_groups"))
        or routing.get("score_func") == "sigmoid",
    )


# ------------------------------------------------------------------------------ module
def _record_router_logits(logits: torch.Tensor) -> None:
    """Hand ``logits`` to transformers' output collector when it asks for router logits
    (``output_router_logits=True``); the hook it would have put on the HF router is gone."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older transformers: no collector
        return
    collected = _active_collector.get()
    if collected is not None and "router_logits" in collected:
        collected["router_logits"].append(logits)


class HFMoE(MoE):
    """A :class:`moekit.MoE` standing in for a transformers sparse MoE block: takes the block's
    input, returns what the block returned (a tensor, or GPT-OSS's ``(y, topk weights)`` / Llama
    4's ``(y, router logits)``), and reports router logits to ``output_router_logits``."""

    hf_returns: str = RET_TENSOR

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):  # noqa: D401
        moe_kwargs = {
            k: kwargs[k] for k in ("input_ids", "token_mask", "router_logits") if k in kwargs
        }
        y, r = self.forward_with_routing(hidden_states, **moe_kwargs)  # r inside the autograd graph
        if r is not None:
            _record_router_logits(r.logits)
        if self.hf_returns == RET_WEIGHTS:
            return y, r.topk_weights.to(y.dtype)
        if self.hf_returns == RET_LOGITS:
            return y, r.logits
        return y

    def hf_tensors(self, which: str = "data") -> dict[str, torch.Tensor]:
        """This module's tensors (``which="data"``) or gradients (``"grad"``) under the original
        block's names and layout (relative to the block), e.g. to compare with the original."""
        out = {}
        for en in self.__dict__.get("_hf_entries", []):
            _, _, cur = _get(self, en.moekit)
            t = cur.detach() if which == "data" else cur.grad
            if t is not None:
                out[en.hf] = to_hf(en.kind, t, self.__dict__["_hf_dtypes"][en.hf])
        return out

    @property
    def hf_block(self) -> nn.Module | None:
        """The original transformers block (its tensors are placeholders while patched)."""
        return self.__dict__.get("_hf_block")


# ------------------------------------------------------------------------------ detection
_ROUTER_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
_SHARED_GATE_NAMES = ("shared_expert_gate",)


def _is_candidate_block(mod: nn.Module) -> bool:
    ex = getattr(mod, "experts", None)
    return isinstance(ex, nn.Module) and hasattr(ex, "has_gate") and hasattr(ex, "is_transposed")


def _generic_spec(block: nn.Module, cfg, where: str) -> tuple[FamilySpec, list[dict]]:
    """Read a non-listed family's layout from its block; return the spec and the routing
    candidates to try (config-derived guess first)."""
    ex = block.experts
    router_name = next(
        (n for n in _ROUTER_NAMES if isinstance(getattr(block, n, None), nn.Module)), None
    )
    if router_name is None:
        raise PatchError(f"{where}: no router child named {_ROUTER_NAMES}")
    router = getattr(block, router_name)
    E = ex.down_proj.shape[0]
    router_linear, lin = "", router
    if not isinstance(getattr(router, "weight", None), torch.Tensor):
        # the gate Linear may sit inside the router (e.g. HunYuan's ``gate.wg``)
        lins = [(n, m) for n, m in router.named_children() if isinstance(m, nn.Linear)]
        if len(lins) == 1:
            router_linear, lin = lins[0]
    w = getattr(lin, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] != E:
        raise PatchError(
            f"{where}: router {router_name!r} has no gate weight [num_experts={E}, hidden]"
        )
    if getattr(ex, "has_post_expert_norm", False):
        raise PatchError(
            f"{where}: experts apply a post-expert norm, which moekit.MoE does not have"
        )
    transposed, concat = bool(ex.is_transposed), bool(getattr(ex, "is_concatenated", True))
    if not concat and not transposed:
        raise PatchError(f"{where}: interleaved, non-transposed experts layout is not supported")
    layout = CONCAT if not transposed else (TRANSPOSED if concat else INTERLEAVED_TRANSPOSED)
    from transformers.integrations.moe import _default_apply_gate

    experts_kw: dict = {}
    if ex.has_gate and getattr(type(ex), "_apply_gate", None) is not _default_apply_gate:
        if type(ex).__name__.startswith("GptOss") or "swiglu_limit" in vars(cfg):
            from ..activations import GPT_OSS_ALPHA, GPT_OSS_LIMIT

            a, lim = getattr(ex, "alpha", GPT_OSS_ALPHA), getattr(ex, "limit", GPT_OSS_LIMIT)
            if float(a) != GPT_OSS_ALPHA or float(lim) != GPT_OSS_LIMIT:
                raise PatchError(
                    f"{where}: clamped GLU with alpha={a}, limit={lim}; moekit's 'gpt_oss' "
                    f"activation is fixed at alpha={GPT_OSS_ALPHA}, limit={GPT_OSS_LIMIT}"
                )
            experts_kw["activation"] = "gpt_oss"
        else:
            raise PatchError(
                f"{where}: experts {type(ex).__name__} use their own gate function (_apply_gate)"
            )
    else:
        act = hf_activation_name(getattr(ex, "act_fn", None))
        if act is None:
            raise PatchError(
                f"{where}: experts activation {type(getattr(ex, 'act_fn', None)).__name__} has no moekit equivalent"
            )
        experts_kw["activation"] = act
    if not ex.has_gate:
        experts_kw["gated"] = False
    if getattr(ex, "has_bias", False):
        experts_kw["use_bias"] = True
    if not ex.has_gate and layout == INTERLEAVED_TRANSPOSED:
        raise PatchError(f"{where}: interleaved layout without a gate")

    shared_name = next(
        (n for n in _SHARED_NAMES if isinstance(getattr(block, n, None), nn.Module)), None
    )
    shared_hidden = None
    if shared_name is not None:
        sm = getattr(block, shared_name)
        up = getattr(sm, "up_proj", None)
        down = getattr(sm, "down_proj", None)
        if not isinstance(up, nn.Linear) or not isinstance(down, nn.Linear):
            raise PatchError(f"{where}: shared expert {shared_name!r} is not a gate/up/down MLP")
        lin = [m for m in (getattr(sm, "gate_proj", None), up, down) if m is not None]
        if any(m.bias is not None for m in lin):
            raise PatchError(
                f"{where}: shared expert {shared_name!r} has biases (moekit's have none)"
            )
        shared_hidden = up.out_features
        sact = hf_activation_name(getattr(sm, "act_fn", None) or getattr(sm, "activation_fn", None))
        if (
            sact != experts_kw.get("activation", "silu")
            and experts_kw.get("activation") != "gpt_oss"
        ):
            raise PatchError(f"{where}: shared expert activation differs from the routed experts'")
    shared_gate = next(
        (n for n in _SHARED_GATE_NAMES if isinstance(getattr(block, n, None), nn.Linear)), None
    )
    if shared_gate is not None and shared_name is None:
        raise PatchError(f"{where}: shared expert gate without a shared expert")

    known = {router_name, "experts", shared_name, shared_gate} - {None}
    extra = [
        n for n, m in block.named_children() if n not in known and any(True for _ in m.parameters())
    ]
    extra += [n for n, _ in block.named_parameters(recurse=False)]
    if extra:
        raise PatchError(f"{where}: block has parameters moekit.MoE does not hold: {extra}")

    base = routing_from_config(cfg)
    base["use_router_bias"] = isinstance(getattr(lin, "bias", None), torch.Tensor)
    base["use_expert_bias"] = isinstance(
        getattr(router, "e_score_correction_bias", None), torch.Tensor
    )
    spec = FamilySpec(
        name=f"generic:{type(block).__name__}",
        model_types=(),
        block_classes=(type(block).__name__,),
        router=router_name,
        router_linear=router_linear,
        shared=shared_name,
        shared_gate=shared_gate,
        layout=layout,
        expert_hidden=lambda c, f=ex.down_proj.shape[1 if transposed else 2]: f,
        shared_hidden=(lambda c, h=shared_hidden: h) if shared_name else None,
        routing=lambda c: dict(base),
        experts_kwargs=lambda c, kw=experts_kw: dict(kw),
        router_in_fp32=base["use_expert_bias"] or bool(base.get("num_expert_groups")),
    )
    cands = [dict(base)]
    groups = [{}]
    if base.get("num_expert_groups"):
        g = {k: base[k] for k in ("num_expert_groups", "num_limited_groups")}
        groups = [g, dict(g, group_score="max"), {}]
    for score in ("softmax", "sigmoid"):
        for before in (False, True):
            for norm in (False, True):
                for grp in groups if not before else [{}]:
                    c = {
                        k: v
                        for k, v in base.items()
                        if k not in ("num_expert_groups", "num_limited_groups", "group_score")
                    }
                    c.update(score_func=score, topk_before_score=before, route_norm=norm, **grp)
                    if c not in cands:
                        cands.append(c)
    return spec, cands


def _split_router_output(out, E: int):
    """(weights, indices) of a router's output tuple, whatever its order: the integer tensor
    is the indices, the float tensor with K columns the weights (the conventional
    ``(logits, weights, indices)`` order when K == E makes the two alike)."""
    if (
        not isinstance(out, tuple)
        or len(out) != 3
        or not all(isinstance(t, torch.Tensor) for t in out)
    ):
        return None, None
    ints = [t for t in out if not t.is_floating_point()]
    floats = [t for t in out if t.is_floating_point()]
    if len(ints) != 1 or len(floats) != 2:
        return None, None
    ids = ints[0]
    K = ids.shape[-1]
    by_k = [t for t in floats if t.shape[-1] == K and t.shape[-1] != E]
    if len(by_k) == 1:
        return by_k[0], ids
    return (out[1], ids) if out[2] is ids else (floats[1], ids)


def _router_matches(
    hf_router: nn.Module,
    moe_router_cfg: TokenChoiceTopKRouter.Config,
    D: int,
    E: int,
    router_linear: str = "",
    where: str = "",
) -> bool:
    """Whether a moekit router with ``moe_router_cfg`` routes like ``hf_router`` (tested on a
    float64 copy with random weights and biases, so zero-initialised biases cannot hide a
    difference)."""
    ref = copy.deepcopy(hf_router).to("cpu", torch.float64)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, t in list(ref.named_parameters()) + list(ref.named_buffers()):
            if t.is_floating_point():
                t.copy_(
                    torch.randn(t.shape, generator=g, dtype=t.dtype)
                    * (0.5 if "bias" in name else 1.0)
                )
        x = torch.randn(97, D, generator=g, dtype=torch.float64)
        try:
            out = ref(x)
        except Exception as e:  # a router that is not self-contained (needs more inputs)
            raise PatchError(
                f"{where}: its router {type(hf_router).__name__} cannot be called on hidden states "
                f"alone ({type(e).__name__}: {e}); not a router moekit can stand in for"
            ) from None
        w_hf, ids_hf = _split_router_output(out, E)
        if ids_hf is None:
            raise PatchError(
                f"{where}: its router {type(hf_router).__name__} does not return "
                "(logits, weights, indices) in any order"
            )
        try:
            mr = (
                moe_router_cfg.replace(router_dtype=torch.float64)
                .build(dim=D, num_experts=E)
                .double()
            )
        except ValueError:
            return False
        lin = ref.get_submodule(router_linear) if router_linear else ref
        mr.gate.weight.copy_(lin.weight)
        if mr.gate.bias is not None:
            mr.gate.bias.copy_(lin.bias)
        if mr.expert_bias is not None:
            mr.expert_bias = ref.e_score_correction_bias.detach().clone().double()
        r = mr(x)
    if w_hf.shape[-1] == E and ids_hf.shape[-1] != E:
        w_hf = w_hf.gather(1, ids_hf)
    if ids_hf.shape != r.topk_ids.shape:
        return False
    a_ids, a_ord = ids_hf.sort(dim=1)
    b_ids, b_ord = r.topk_ids.sort(dim=1)
    if not torch.equal(a_ids, b_ids):
        return False
    return torch.allclose(
        w_hf.double().gather(1, a_ord),
        r.topk_weights.double().gather(1, b_ord),
        atol=1e-6,
        rtol=1e-5,
    )


# ------------------------------------------------------------------------------ build
def _get(root: nn.Module, path: str):
    mod_path, _, leaf = path.rpartition(".")
    mod = root.get_submodule(mod_path) if mod_path else root
    return mod, leaf, getattr(mod, leaf, None)


def _find(root: nn.Module, path: str):
    try:
        t = _get(root, path)[2]
    except AttributeError:
        return None
    return t if isinstance(t, torch.Tensor) else None


def _build_moe(
    cfg: MoE.Config, block: nn.Module, entries: list[Entry], where: str, returns: str
) -> HFMoE:
    with torch.device("meta"):
        moe = HFMoE(cfg)
    moe.hf_returns = returns
    device = None
    for en in entries:
        _, _, t = _get(block, en.hf)
        if not isinstance(t, torch.Tensor):
            raise PatchError(f"{where}: expected a tensor at {en.hf!r}")
        mod, leaf, cur = _get(moe, en.moekit)
        if cur is None or tuple(cur.shape) != tuple(
            to_moekit(en.kind, t.detach().to("meta")).shape
        ):
            raise PatchError(
                f"{where}: {en.hf} {tuple(t.shape)} does not fit moekit's {en.moekit} "
                f"{None if cur is None else tuple(cur.shape)}"
            )
        device = t.device
        if isinstance(cur, nn.Parameter):
            if en.kind == SAME and isinstance(t, nn.Parameter):
                new = t  # the very same Parameter: shared storage, optimizer state stays valid
            else:
                new = nn.Parameter(to_moekit(en.kind, t.detach()), requires_grad=t.requires_grad)
            setattr(mod, leaf, new)
        else:
            setattr(mod, leaf, to_moekit(en.kind, t.detach()))
    for name, p in list(moe.named_parameters()):
        if p.is_meta:
            raise PatchError(f"{where}: moekit parameter {name} has no counterpart in the block")
    for name, b in list(moe.named_buffers()):
        if b.is_meta:
            mod, leaf, _ = _get(moe, name)
            setattr(mod, leaf, torch.zeros(b.shape, dtype=b.dtype, device=device))
    return moe


def _strip(block: nn.Module, entries: list[Entry]) -> dict:
    """Replace the block's mapped tensors by meta placeholders; return their dtypes."""
    dtypes = {}
    for en in entries:
        mod, leaf, t = _get(block, en.hf)
        dtypes[en.hf] = t.dtype
        ph = torch.empty(t.shape, dtype=t.dtype, device="meta")
        setattr(
            mod,
            leaf,
            nn.Parameter(ph, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else ph,
        )
    return dtypes


def _probe_and_compare(block, moe, D, where, verify_tol):
    p = next(iter(moe.parameters()))
    if p.is_meta:
        return None
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 5, D, generator=g).to(p.device, p.dtype)
    with torch.no_grad():
        ref = block(x.clone())
        got = moe(x.clone())
    moe.reset_load()
    ref_y = (ref[0] if isinstance(ref, tuple) else ref).reshape(-1, D)
    got_y = (got[0] if isinstance(got, tuple) else got).reshape(-1, D)
    if isinstance(ref, tuple) != isinstance(got, tuple):
        return f"the block returns {type(ref).__name__}, moekit's returns {type(got).__name__}"
    scale = ref_y.abs().max().item() + 1e-6
    err = (ref_y.float() - got_y.float()).abs().max().item()
    tol = (
        verify_tol
        if verify_tol is not None
        else (1e-4 if p.dtype in (torch.float32, torch.float64) else 3e-2)
    )
    if err > tol * scale:
        return f"output differs from the original block on a probe (max abs err {err:.3g} vs scale {scale:.3g})"
    return None


def _returns_of(block, D, E, K, device, dtype) -> str:
    x = torch.randn(1, 3, D, device=device, dtype=dtype)
    with torch.no_grad():
        out = block(x)
    if not isinstance(out, tuple):
        return RET_TENSOR
    if len(out) == 2 and isinstance(out[1], torch.Tensor):
        if out[1].shape[-1] == E and K != E:
            return RET_LOGITS
        return RET_WEIGHTS
    raise PatchError(
        f"block returns a {len(out)}-tuple; moekit knows (y,), (y, weights), (y, logits)"
    )


def _patch_block(
    block: nn.Module, where: str, model_cfg, backend: str, verify: bool, verify_tol
) -> HFMoE:
    cfg_src = getattr(block.experts, "config", None) if hasattr(block, "experts") else None
    hf_cfg = _text_config(cfg_src if cfg_src is not None else model_cfg)
    spec = spec_for_block(block)
    if spec is not None:
        try:
            moe_cfg = config_from_hf(hf_cfg, backend=backend, spec=spec)
        except PatchError as e:
            raise PatchError(f"{where} ({type(block).__name__}): {e}") from None
        returns = spec.returns
    else:
        spec, cands = _generic_spec(block, hf_cfg, f"{where} ({type(block).__name__})")
        router = getattr(block, spec.router)
        lin = router.get_submodule(spec.router_linear) if spec.router_linear else router
        E, D = lin.weight.shape
        K = getattr(router, "top_k", None) or getattr(block, "top_k", None) or top_k_of(hf_cfg)
        if not isinstance(K, int):
            raise PatchError(f"{where} ({type(block).__name__}): cannot tell its top-k")
        base = config_from_hf(hf_cfg, backend=backend, spec=spec, _num_experts=E, _top_k=K)
        moe_cfg = None
        for c in cands:
            try:
                rc = TokenChoiceTopKRouter.Config(
                    top_k=base.router.top_k, router_dtype=base.router.router_dtype, **c
                )
            except ValueError:
                continue
            if _router_matches(
                router, rc, D, E, spec.router_linear, f"{where} ({type(block).__name__})"
            ):
                moe_cfg = base.replace(router=rc)
                break
        if moe_cfg is None:
            raise PatchError(
                f"{where} ({type(block).__name__}): its router {type(router).__name__} routes in a way "
                "moekit's TokenChoiceTopKRouter does not express (tried softmax/sigmoid, "
                "score-then-topk/topk-then-score, with and without normalisation, the config's "
                "groups, scale and biases)"
            )
        p = lin.weight
        returns = (
            RET_TENSOR
            if p.is_meta
            else _returns_of(
                block, D, E, moe_cfg.router.top_k, p.device, block.experts.down_proj.dtype
            )
        )
    entries = block_param_map(spec, moe_cfg)
    moe = _build_moe(moe_cfg, block, entries, f"{where} ({type(block).__name__})", returns)
    if verify:
        was_training = block.training
        block.eval()
        moe.eval()
        why = _probe_and_compare(block, moe, moe_cfg.dim, where, verify_tol)
        block.train(was_training)
        moe.train(was_training)
        if why:
            raise PatchError(f"{where} ({type(block).__name__}, {spec.name}): {why}; not patched")
    moe.train(block.training)
    dtypes = _strip(block, entries)
    moe.__dict__["_hf_block"] = block
    moe.__dict__["_hf_entries"] = entries
    moe.__dict__["_hf_dtypes"] = dtypes
    moe.__dict__["_hf_family"] = spec.name
    return moe


def _iter_blocks(model: nn.Module):
    for name, mod in model.named_modules():
        if isinstance(mod, HFMoE):
            continue
        if spec_for_block(mod) is not None or _is_candidate_block(mod):
            yield name, mod
        elif isinstance(getattr(mod, "experts", None), nn.ModuleList) and any(
            isinstance(getattr(mod, n, None), nn.Module) for n in _ROUTER_NAMES
        ):
            raise PatchError(
                f"{name} ({type(mod).__name__}): per-expert ModuleList experts are not patched in a live "
                "model; convert the checkpoint with moekit.hf.from_hf_state_dict instead"
            )


def _set_child(model: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, leaf = qualname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def patch(
    model: nn.Module, *, backend: str = "auto", verify: bool = True, verify_tol: float | None = None
) -> list[str]:
    """Replace, in place, every sparse MoE block of ``model`` by an :class:`HFMoE`; return the
    qualified names replaced.

    Every block is checked before it is swapped: its config must be expressible (else
    :class:`PatchError` naming the block and the reason) and, with ``verify`` (default), the
    new module must reproduce the block's output on a small random probe (tolerance
    ``verify_tol`` relative to the output's max, default 1e-4 in fp32 and 3e-2 in 16-bit).
    Nothing is swapped unless every block passes.
    """
    blocks = [(n, m) for n, m in _iter_blocks(model)]
    if not blocks:
        return []
    model_cfg = getattr(model, "config", None)
    new = [(n, _patch_block(m, n, model_cfg, backend, verify, verify_tol)) for n, m in blocks]
    for n, moe in new:
        _set_child(model, n, moe)
    return [n for n, _ in new]


def unpatch(model: nn.Module) -> list[str]:
    """Put back the transformers block of every :class:`HFMoE` in ``model`` with the current
    weights (the same Parameter objects where the layout agrees, converted otherwise; the
    aux-loss-free expert bias goes back to ``e_score_correction_bias``). Returns the names."""
    done = []
    for name, moe in [(n, m) for n, m in model.named_modules() if isinstance(m, HFMoE)]:
        block = moe.hf_block
        if block is None:
            raise ValueError(
                f"{name}: this HFMoE was not made by moekit.hf.patch (no original block)"
            )
        missing = [
            en.moekit
            for en in moe.__dict__["_hf_entries"]
            if _find(moe, en.moekit) is None
            or tuple(to_hf(en.kind, _find(moe, en.moekit).detach().to("meta")).shape)
            != tuple(_get(block, en.hf)[2].shape)
        ]
        if missing or not isinstance(moe.experts, GroupedExperts):
            raise ValueError(
                f"{name}: cannot unpatch, the MoE no longer holds its full weights {missing[:3]} "
                f"(experts: {type(moe.experts).__name__}; after apply_ep the experts are sharded "
                "over ranks: unpatch a full single-process copy instead)"
            )
        for en in moe.__dict__["_hf_entries"]:
            _, _, cur = _get(moe, en.moekit)
            mod, leaf, old = _get(block, en.hf)
            dtype = moe.__dict__["_hf_dtypes"][en.hf]
            if isinstance(old, nn.Parameter):
                if en.kind == SAME and isinstance(cur, nn.Parameter):
                    val = cur
                else:
                    val = nn.Parameter(
                        to_hf(en.kind, cur.detach(), dtype), requires_grad=cur.requires_grad
                    )
            else:
                val = to_hf(en.kind, cur.detach(), dtype)
            setattr(mod, leaf, val)
        block.train(moe.training)
        _set_child(model, name, block)
        done.append(name)
    return done


def grads_by_hf_name(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gradients of ``model`` under the transformers names and layouts: those of patched
    blocks mapped back to the original block's parameters (to compare with an unpatched
    copy)."""
    out = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for qn, mod in model.named_modules():
        if isinstance(mod, HFMoE):
            for k in [k for k in out if k.startswith(qn + ".")]:
                del out[k]
            for hk, g in mod.hf_tensors("grad").items():
                out[f"{qn}.{hk}"] = g
    return out
