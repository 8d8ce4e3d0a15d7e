"""Building the :class:`HFMoE` of one transformers block: its config (named family or
detected structure), its tensors taken from the block, the probe that checks it computes what
the block computed, and the block's tensors replaced by placeholders (:func:`patch_block`)."""

from __future__ import annotations

import torch
from torch import nn

from ..moe import MoE
from ..router import TokenChoiceTopKRouter
from .block_spec import generic_spec
from .derive import config_from_hf, text_config
from .families import spec_for_block
from .family_spec import (
    RET_FLAT_LOGITS,
    RET_LOGITS,
    RET_TENSOR,
    RET_WEIGHTS,
    top_k_of,
)
from .hf_moe import HFMoE
from .layout import (
    LEADING,
    PARTS,
    SAME,
    Entry,
    PatchError,
    block_param_map,
    expert_index,
    get_path,
    to_moekit,
)
from .probe import router_matches

__all__ = ["patch_block", "attach_block", "relaid_entries", "relayout"]


def _build_moe(
    cfg: MoE.Config,
    block: nn.Module,
    entries: list[Entry],
    where: str,
    returns: str,
    flat: bool = False,
) -> HFMoE:
    try:
        with torch.device("meta"):
            moe = HFMoE(cfg)
    except ValueError as e:  # a moekit check the block's configuration fails
        raise PatchError(f"{where}: {e}") from e
    moe.hf_returns = returns
    moe.hf_flat_output = flat
    device = None
    assigned = set()
    E = cfg.num_experts
    parts: dict[str, list] = {}  # moekit path -> [(entry, HF tensor)] of its parts
    for en in entries:
        _, _, t = get_path(block, en.hf)
        if not isinstance(t, torch.Tensor):
            raise PatchError(f"{where}: expected a tensor at {en.hf!r}")
        device = t.device
        if en.kind in PARTS or expert_index(en.kind) is not None:
            parts.setdefault(en.moekit, []).append((en, t))
            continue
        mod, leaf, cur = get_path(moe, en.moekit)
        if cur is None or tuple(cur.shape) != tuple(
            to_moekit(en.kind, t.detach().to("meta"), E).shape
        ):
            raise PatchError(
                f"{where}: {en.hf} {tuple(t.shape)} does not fit moekit's {en.moekit} "
                f"{None if cur is None else tuple(cur.shape)}"
            )
        if isinstance(cur, nn.Parameter):
            if en.kind == SAME and isinstance(t, nn.Parameter):
                new = t  # the very same Parameter: shared storage, optimizer state stays valid
            else:
                new = nn.Parameter(to_moekit(en.kind, t.detach(), E), requires_grad=t.requires_grad)
            setattr(mod, leaf, new)
        else:
            setattr(mod, leaf, to_moekit(en.kind, t.detach(), E))
        assigned.add(en.moekit)
        if en.kind == LEADING:  # rows the block holds and never reads: kept for unpatch
            moe.__dict__.setdefault("_hf_tails", {})[en.hf] = t.detach()[E:]
    for path, items in parts.items():  # e.g. DBRX's w1 and v1 -> gate_up_proj (a copy)
        mod, leaf, cur = get_path(moe, path)
        if expert_index(items[0][0].kind) is not None:  # per-expert weights, stacked (a copy)
            items.sort(key=lambda it: expert_index(it[0].kind))
            val = torch.stack([t.detach() for _, t in items])
        else:
            items.sort(key=lambda it: PARTS.index(it[0].kind))
            val = torch.cat([to_moekit(en.kind, t.detach(), E) for en, t in items], dim=1)
        if cur is None or tuple(cur.shape) != tuple(val.shape):
            raise PatchError(
                f"{where}: {[en.hf for en, _ in items]} do not fit moekit's {path} "
                f"{None if cur is None else tuple(cur.shape)}"
            )
        setattr(mod, leaf, nn.Parameter(val, requires_grad=items[0][1].requires_grad))
        assigned.add(path)
    for name, p in list(moe.named_parameters()):
        if name not in assigned:
            raise PatchError(f"{where}: moekit parameter {name} has no counterpart in the block")
    for name, b in list(moe.named_buffers()):
        if name not in assigned:
            mod, leaf, _ = get_path(moe, name)
            setattr(mod, leaf, torch.zeros(b.shape, dtype=b.dtype, device=device))
    return moe


def _strip(block: nn.Module, entries: list[Entry]) -> dict:
    """Replace the block's mapped tensors by meta placeholders; return their dtypes."""
    dtypes = {}
    for en in entries:
        mod, leaf, t = get_path(block, en.hf)
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
    kw = {}
    rc = getattr(moe.router, "config", None)
    if getattr(rc, "routing", None) == "hash":  # the block routes by token ids: give it some
        ids = torch.randint(0, rc.hash_vocab_size, (2, 5), generator=g)
        kw["input_ids"] = ids.to(p.device)
    with torch.no_grad():
        ref = block(x.clone(), **kw)
        got = moe(x.clone(), **kw)
    moe.reset_load()
    if isinstance(ref, tuple) != isinstance(got, tuple):
        return f"the block returns {type(ref).__name__}, moekit's returns {type(got).__name__}"
    ref_y = ref[0] if isinstance(ref, tuple) else ref
    got_y = got[0] if isinstance(got, tuple) else got
    if ref_y.shape != got_y.shape:
        return f"the block returns shape {tuple(ref_y.shape)}, moekit's {tuple(got_y.shape)}"
    ref_y, got_y = ref_y.reshape(-1, D), got_y.reshape(-1, D)
    scale = ref_y.abs().max().item() + 1e-6
    err = (ref_y.float() - got_y.float()).abs().max().item()
    tol = (
        verify_tol
        if verify_tol is not None
        else (1e-4 if p.dtype in (torch.float32, torch.float64) else 3e-2)
    )
    if err > tol * scale:
        return (
            "output differs from the original block on a probe "
            f"(max abs err {err:.3g} vs scale {scale:.3g})"
        )
    return None


def _verify(block, moe, D, where, verify_tol) -> str | None:
    was_training = block.training
    block.eval()
    moe.eval()
    try:
        return _probe_and_compare(block, moe, D, where, verify_tol)
    finally:
        block.train(was_training)
        moe.train(was_training)


def _returns_of(block, D, E, K, device, dtype) -> tuple[str, bool]:
    """What the block returns (a tensor, (y, weights), (y, logits), or both flattened to 1-D
    as ERNIE-VL's do) and whether its y is flattened to ``[T, D]`` rows from a ``[B, S, D]``
    input."""
    x = torch.randn(1, 3, D, device=device, dtype=dtype)
    with torch.no_grad():
        out = block(x)
    y = out[0] if isinstance(out, tuple) else out
    flat = isinstance(y, torch.Tensor) and y.dim() == 2
    if not isinstance(out, tuple):
        return RET_TENSOR, flat
    if len(out) == 2 and isinstance(out[1], torch.Tensor):
        if y.dim() == 1 and out[1].dim() == 1 and out[1].numel() == 3 * E:
            return RET_FLAT_LOGITS, False
        if out[1].shape[-1] == E and K != E:
            return RET_LOGITS, flat
        return RET_WEIGHTS, flat
    raise PatchError(
        f"block returns a {len(out)}-tuple; moekit knows (y,), (y, weights), (y, logits)"
    )


def patch_block(
    block: nn.Module, where: str, model_cfg, backend: str, verify: bool, verify_tol
) -> HFMoE:
    cfg_src = getattr(block.experts, "config", None) if hasattr(block, "experts") else None
    hf_cfg = text_config(cfg_src if cfg_src is not None else model_cfg)
    spec = spec_for_block(block)
    if spec is not None:
        try:
            configs = [config_from_hf(hf_cfg, backend=backend, spec=spec)]
            block_router = spec.extra.get("block_router")  # a router that differs per block
            if block_router is not None and block_router(block, hf_cfg):
                c = configs[0]
                configs = [c.replace(router=c.router.replace(**block_router(block, hf_cfg)))]
        except (PatchError, ValueError) as e:
            raise PatchError(f"{where} ({type(block).__name__}): {e}") from None
        returns, flat = spec.returns, bool(spec.extra.get("flat_output"))
    else:
        if any(t.is_meta for t in block.parameters()):
            raise PatchError(
                f"{where} ({type(block).__name__}): on the meta device; moekit recognises a "
                "family outside its map by running the block's router on real weights, so "
                "patch this one after loading the weights (families in moekit.hf.FAMILIES "
                "patch on the meta device)"
            )
        spec, cands = generic_spec(block, hf_cfg, f"{where} ({type(block).__name__})")
        router = getattr(block, spec.router)
        lin = router.get_submodule(spec.router_linear) if spec.router_linear else router
        E, D = lin.weight.shape
        K = getattr(router, "top_k", None) or getattr(block, "top_k", None) or top_k_of(hf_cfg)
        if not isinstance(K, int):
            raise PatchError(f"{where} ({type(block).__name__}): cannot tell its top-k")
        base = config_from_hf(hf_cfg, backend=backend, spec=spec, _num_experts=E, _top_k=K)
        configs = []
        for c in cands:
            try:
                rc = TokenChoiceTopKRouter.Config(
                    top_k=base.router.top_k, router_dtype=base.router.router_dtype, **c
                )
            except ValueError:
                continue
            factor = router_matches(
                router, rc, D, E, spec.router_linear, f"{where} ({type(block).__name__})",
                bias_arg=spec.extra.get("router_bias_arg", False),
                bias_path=spec.extra.get("router_bias_path"),
            )
            if factor is not None:
                configs = [base.replace(router=rc)]
                if abs(factor - 1.0) > 1e-9:  # a constant in the router, or in the block
                    scaled = rc.replace(route_scale=rc.route_scale * factor)
                    configs.insert(0, base.replace(router=scaled))
                break
        if not configs:
            raise PatchError(
                f"{where} ({type(block).__name__}): its router {type(router).__name__} routes "
                "in a way "
                "moekit's TokenChoiceTopKRouter does not express (tried softmax/sigmoid, "
                "score-then-topk/topk-then-score, with and without normalisation, the config's "
                "groups, scale and biases)"
            )
        p = lin.weight
        returns, flat = (
            (RET_TENSOR, False)
            if p.is_meta
            else _returns_of(block, D, E, K, p.device, block.experts.down_proj.dtype)
        )
    for i, moe_cfg in enumerate(configs):
        entries = block_param_map(spec, moe_cfg)
        name = f"{where} ({type(block).__name__})"
        moe = _build_moe(moe_cfg, block, entries, name, returns, flat)
        why = _verify(block, moe, moe_cfg.dim, where, verify_tol) if verify else None
        if why is None:
            break
        if i == len(configs) - 1:
            raise PatchError(f"{where} ({type(block).__name__}, {spec.name}): {why}; not patched")
    moe.train(block.training)
    moe.__dict__["_hf_entries"] = entries
    moe.__dict__["_hf_family"] = spec.name
    return moe


def relaid_entries(entries: list[Entry]) -> list[Entry]:
    """The entries whose block Parameter maps one to one onto a moekit Parameter in another
    layout (GPT-OSS's interleaved gate/up and transposed down projection, Llama 4's transposed
    experts, LongCat's leading rows): the Parameter object moves between the two, with its
    tensor (and gradient) converted. Parts of one moekit tensor (DBRX's rows, per-expert
    modules) are stacked into a new Parameter instead."""
    paths = [en.moekit for en in entries]
    return [en for en in entries
            if en.kind != SAME and en.kind not in PARTS and expert_index(en.kind) is None
            and paths.count(en.moekit) == 1]


def relayout(p: nn.Parameter, value: torch.Tensor, grad: torch.Tensor | None) -> nn.Parameter:
    """``p`` holding ``value`` (another layout of its tensor) and ``grad`` (its gradient in
    that layout, or None): the same Parameter object, so that an optimizer holding it keeps
    updating the tensor the model uses."""
    with torch.no_grad():
        p.data = value
    p.grad = grad
    return p


def attach_block(moe: HFMoE, block: nn.Module) -> None:
    """Hand the block's tensors over to ``moe`` for good: the block keeps meta placeholders
    and stays with ``moe`` (outside the module tree) for ``unpatch``. Where a block
    Parameter maps one to one onto a moekit Parameter in another layout, ``moe`` takes the
    block's Parameter object with the converted tensor (:func:`relaid_entries`)."""
    entries = moe.__dict__["_hf_entries"]
    relaid = [(en, get_path(block, en.hf)[2]) for en in relaid_entries(entries)]
    moe.__dict__["_hf_dtypes"] = _strip(block, entries)
    moe.__dict__["_hf_block"] = block
    E = moe.config.num_experts
    for en, old in relaid:
        mod, leaf, new = get_path(moe, en.moekit)
        if isinstance(old, nn.Parameter) and isinstance(new, nn.Parameter) and old is not new:
            grad = None if old.grad is None else to_moekit(en.kind, old.grad, E)
            setattr(mod, leaf, relayout(old, new.detach(), grad))
