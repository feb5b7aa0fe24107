"""`parameter_report`: dense against LORS parameter counts, per stack and in total."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .discovery import sharing_stacks, stack_parameters, submodule_or_none
from .layer import LorsLinear
from .surgery import SHARED_CONTAINER, check_model, shared_owner


@dataclass
class ReportRow:
    name: str
    layers: int
    dense: int
    lors: int

    @property
    def reduction(self) -> float:
        return 1.0 - self.lors / self.dense if self.dense else 0.0


@dataclass
class ParameterReport:
    """Parameter counts of a model as a dense model and as it is now (LORS), per stack and in total.

    ``str(report)`` is a printable table; `to_dict` gives the numbers.
    """

    stacks: list[ReportRow] = field(default_factory=list)
    total: ReportRow | None = None

    @property
    def stacks_total(self) -> ReportRow:
        return ReportRow("all stacks", sum(r.layers for r in self.stacks), sum(r.dense for r in self.stacks),
                         sum(r.lors for r in self.stacks))

    def to_dict(self) -> dict:
        def row(r: ReportRow) -> dict:
            return {"name": r.name, "layers": r.layers, "dense": r.dense, "lors": r.lors,
                    "reduction": round(r.reduction, 6)}
        return {"stacks": [row(r) for r in self.stacks], "stacks_total": row(self.stacks_total),
                "model_total": None if self.total is None else row(self.total)}

    def __str__(self) -> str:
        lines = [f"{'stack':<34} {'layers':>6} {'dense':>13} {'LORS':>13} {'reduction':>9}"]
        # stacks_total builds a new row on each access; `total` is None in a report not built by parameter_report
        totals = [r for r in (self.stacks_total, self.total) if r is not None]
        for r in [*self.stacks, *totals]:
            if any(r is total for total in totals):
                lines.append("-" * len(lines[0]))
            lines.append(f"{r.name:<34} {r.layers:>6} {r.dense:>13,} {r.lors:>13,} {r.reduction:>9.1%}")
        return "\n".join(lines)


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count parameters per stack and in total, dense against LORS (equal for a dense model).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> from lors_hf import lorsify
        >>> model = lorsify(BertModel(BertConfig(hidden_size=32, num_hidden_layers=4,
        ...                 num_attention_heads=2, intermediate_size=64)), rank=2)
        >>> report = parameter_report(model)
        >>> report.stacks_total.lors < report.stacks_total.dense
        True
        >>> print(report)  # doctest: +SKIP
    """
    check_model(model, "parameter_report")
    report = ParameterReport()
    extra_total = 0
    for stack in sharing_stacks(model):
        dense = stack_parameters(stack)
        lors = sum(p.numel() for p in stack.blocks.parameters())
        owner, path = shared_owner(model, stack)
        shared = submodule_or_none(owner, f"{SHARED_CONTAINER}.{path}")
        if shared is not None:
            lors += sum(p.numel() for p in shared.parameters())
        report.stacks.append(ReportRow(stack.name, len(stack.blocks), dense, lors))
    now = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, LorsLinear):
            extra_total += module.out_features * module.in_features - module.lors_A.numel() - module.lors_B.numel()
    shared = sum(p.numel() for m in model.modules() if SHARED_CONTAINER in m._modules
                 for p in m._modules[SHARED_CONTAINER].parameters())
    report.total = ReportRow("whole model", sum(r.layers for r in report.stacks), now + extra_total - shared, now)
    return report
