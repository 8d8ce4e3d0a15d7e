"""Expert parallelism over torch.distributed.

    import moekit.parallel as mp
    moe = cfg.build()                      # identical on every rank (same seed)
    mp.apply_ep(moe, group)                # group: ProcessGroup or 1-D DeviceMesh
    y = moe(x_local)                       # each rank its own tokens
    y.backward(g); mp.sync_replicated_grads(moe)   # router / local shared experts

See docs/parallel.md for placements, overlap, the TP-region option and the gradient
conventions.
"""

from . import placement
from .apply import apply_ep, sync_replicated_grads
from .dispatch import AllToAllDispatcher, Dispatcher, Layout
from .ep import ExpertParallel
from .placement import Placement
from .rebalancing import rebalance
from .tp import TPSharedExperts

__all__ = [
    "AllToAllDispatcher",
    "Dispatcher",
    "ExpertParallel",
    "Layout",
    "Placement",
    "TPSharedExperts",
    "apply_ep",
    "placement",
    "rebalance",
    "sync_replicated_grads",
]
