"""Training and post-hoc methods (registry `METHODS`): ERM, GroupDRO, DFR.

    method = build_method(cfg, criterion=build_loss(cfg, mixup_on), group_counts=counts)
    loss = method.loss(logits, targets, groups)         # trainable methods (post_hoc False)
    dfr = method.fit(val_x, val_y, val_g)               # post-hoc methods: DFR on embeddings (`embed`)

Importing this package registers every method; a new one is one decorated class in a module imported here.
"""

from bgmask.methods.base import ERM, METHODS, Flag, Method, build_method, create_method, register_method  # noqa: F401
from bgmask.methods.dfr import C_GRID, DFR, DFRModel, dfr_evaluate, dfr_fit  # noqa: F401
from bgmask.methods.features import embed, last_linear  # noqa: F401
from bgmask.methods.groupdro import GroupBalancedSampler, GroupDRO, check_groups, group_counts  # noqa: F401
