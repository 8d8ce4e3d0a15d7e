"""Hugging Face transformers integration (``pip install 'moekit[hf]'``, transformers >= 5).

* ``experts_implementation="moekit"``: importing this package registers moekit in
  transformers' ``ExpertsInterface`` (:func:`register`), so every ``@use_experts_implementation``
  experts module can run through moekit's grouped experts.
* :func:`patch` / :func:`unpatch`: replace every sparse MoE block by a :class:`moekit.MoE`
  (:class:`HFMoE`) carrying the same weights, and put the transformers blocks back.
* :func:`config_from_hf`: the :class:`moekit.MoE.Config` of a model's sparse block.
* :func:`from_hf_state_dict` / :func:`to_hf_state_dict`: checkpoint conversion.

Modules: experts_impl (the experts backend), family_spec (``FamilySpec``, the layouts, the
config readers), family_rules (the per-family routing and check functions), families (the
named families and their lookups), layout (tensor correspondences), derive (configs), detect
(recognising MoE blocks), block_spec (an unlisted family's spec read from its block),
block_parts (parts of a block's structure), probe (numerical checks of a router or a gate
function), hf_moe (the stand-in module), build (one block), patching (patch/unpatch/save),
convert (state dicts), tiny (test models), discover and coverage (every MoE family of the
installed transformers through both routes).
See docs/hf.md.
"""

try:
    import transformers  # noqa: F401
    from transformers.integrations.moe import ExpertsInterface  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised without transformers only
    raise ImportError(
        "moekit.hf needs transformers >= 5 (with transformers.integrations.moe); "
        "install it with: pip install 'moekit[hf]'"
    ) from e

from .convert import PER_EXPERT_NAMES, from_hf_state_dict, to_hf_state_dict
from .experts_impl import EXPERTS_IMPLEMENTATION, moekit_experts_forward, register
from .families import FAMILIES
from .family_spec import FamilySpec
from .patching import (
    HFMoE,
    PatchError,
    PatchResult,
    config_from_hf,
    find_moe_blocks,
    grads_by_hf_name,
    hf_state_dict,
    patch,
    unpatch,
)

register()

__all__ = [
    "grads_by_hf_name",
    "hf_state_dict",
    "EXPERTS_IMPLEMENTATION",
    "FAMILIES",
    "FamilySpec",
    "HFMoE",
    "PER_EXPERT_NAMES",
    "PatchError",
    "PatchResult",
    "find_moe_blocks",
    "config_from_hf",
    "from_hf_state_dict",
    "moekit_experts_forward",
    "patch",
    "register",
    "to_hf_state_dict",
    "unpatch",
]
