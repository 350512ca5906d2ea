"""Optimizer parameter groups with the TSN/TSM/GC learning-rate and weight-decay multipliers."""

from __future__ import annotations

from torch import nn

from .temporal import GroupContext

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_FIRST_CONV = "first_conv"


def param_groups(
    model: nn.Module, *, lr: float, weight_decay: float, gc_lr_mult: float = 1.0, fc_lr_mult: float = 1.0
) -> list[dict]:
    """Groups for torch.optim.SGD with params, lr, weight_decay, name, lr_mult (schedulers rescale by it).

    (lr mult, wd mult): first conv weight (1, 1); other conv/linear weights (1, 1); biases (2, 0); norm
    weights and biases (1, 0); with gc_lr_mult != 1 the GC parameters (gc_lr_mult, 1) for weights and
    (gc_lr_mult, 0) for norms/biases; with fc_lr_mult != 1 the classifier (fc_lr_mult, 1) weight and
    (fc_lr_mult, 0) bias. Frozen parameters (partial BN) are left out.
    """
    if hasattr(model, "_orig_mod") or isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("param_groups needs the plain model: pass runtime.unwrap_model(model)")
    table = {  # name -> (lr mult, wd mult)
        _FIRST_CONV: (1.0, 1.0),
        "weight": (1.0, 1.0),
        "bias": (2.0, 0.0),
        "norm": (1.0, 0.0),
        "gc_weight": (gc_lr_mult, 1.0),
        "gc_norm_bias": (gc_lr_mult, 0.0),
        "fc_weight": (fc_lr_mult, 1.0),
        "fc_bias": (fc_lr_mult, 0.0),
    }
    members: dict[str, list] = {name: [] for name in table}
    fc = getattr(model, "fc", None)
    first_conv_seen = False
    for module_name, module in model.named_modules():
        in_gc = isinstance(module, GroupContext) or ".gc." in f".{module_name}."
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_bias_like = isinstance(module, _NORMS) or pname == "bias"
            if fc_lr_mult != 1.0 and module is fc:
                group = "fc_bias" if pname == "bias" else "fc_weight"
            elif gc_lr_mult != 1.0 and in_gc:
                group = "gc_norm_bias" if is_bias_like else "gc_weight"
            elif isinstance(module, _NORMS):
                group = "norm"
            elif pname == "bias":
                group = "bias"
            elif isinstance(module, nn.modules.conv._ConvNd) and not first_conv_seen:
                group, first_conv_seen = _FIRST_CONV, True
            else:
                group = "weight"
            members[group].append(p)
    return [
        {
            "params": params,
            "name": name,
            "lr_mult": table[name][0],
            "wd_mult": table[name][1],
            "lr": lr * table[name][0],
            "weight_decay": weight_decay * table[name][1],
        }
        for name, params in members.items()
        if params
    ]
