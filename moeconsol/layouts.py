"""What each architecture's tensor names mean, kept as data.

A layout says, for one on-disk naming scheme, which tensors are experts (layer, expert
index, part), which are routers, and how to rename them to the names transformers uses in
memory. Everything else in a checkpoint is a non-expert tensor. Adding an architecture
(Qwen2-MoE, OLMoE, ...) means adding one `Layout` here and a test.

Expert parts are always handled in a *canonical* form: one 2-D matrix per part, exactly as
the per-expert checkpoints store it (Mixtral `w1` [I, H], `w2` [H, I], `w3` [I, H]; Switch
`wi` [F, D], `wo` [D, F]). Fused layouts store all experts of a layer in one 3-D tensor
whose dim 1 concatenates several parts; `fused_parts` says which.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Layout:
    name: str
    """Layout id recorded in reports and artifacts: "mixtral", "mixtral-fused", "switch"."""
    architecture: str
    """Models of the same architecture can be consolidated together, whatever their layout."""
    model_types: tuple[str, ...]
    """`model_type` values of config.json this layout can appear under."""
    parts: tuple[str, ...]
    """Canonical expert parts, in the order used to flatten an expert into one vector."""
    expert_kind: str
    """How an expert computes: "gated" = w2(act(w1 x) * w3 x); "dense" = wo(act(wi x))."""
    activation_key: str
    """config.json key that names the expert activation function."""
    expert_pattern: str | None = None
    """Regex of a per-expert tensor, with groups `layer`, `expert`, `part`."""
    expert_template: str | None = None
    fused_pattern: str | None = None
    """Regex of a fused tensor holding all experts of a layer, groups `layer`, `fused`."""
    fused_template: str | None = None
    fused_parts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Fused tensor name -> canonical parts concatenated along its dim 1."""
    router_pattern: str = ""
    """Regex of a router weight, group `layer`."""
    renames: tuple[tuple[str, str], ...] = ()
    """(on-disk template, in-memory template): names transformers 5 uses for non-expert tensors."""

    def match_expert(self, name: str) -> tuple[str, int, str] | None:
        if self.expert_pattern and (m := re.fullmatch(self.expert_pattern, name)):
            return m["layer"], int(m["expert"]), m["part"]
        return None

    def match_fused(self, name: str) -> tuple[str, str] | None:
        if self.fused_pattern and (m := re.fullmatch(self.fused_pattern, name)):
            return m["layer"], m["fused"]
        return None

    def match_router(self, name: str) -> str | None:
        m = re.fullmatch(self.router_pattern, name)
        return m["layer"] if m else None

    def canonical_name(self, name: str) -> str:
        """The in-memory (transformers 5) name of a non-expert tensor."""
        return _rename(name, self.renames)

    def disk_name(self, canonical: str) -> str:
        """Inverse of `canonical_name` for this layout."""
        return _rename(canonical, tuple((b, a) for a, b in self.renames))

    def expert_name(self, layer: str, expert: int, part: str) -> str:
        assert self.expert_template is not None
        return self.expert_template.format(layer=layer, expert=expert, part=part)

    def fused_name(self, layer: str, fused: str) -> str:
        assert self.fused_template is not None
        return self.fused_template.format(layer=layer, fused=fused)


def _rename(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    for source, target in renames:
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>.+)", re.escape(source))
        if m := re.fullmatch(pattern, name):
            return target.format(**m.groupdict())
    return name


_MIXTRAL_LAYER = r"(?P<layer>model\.layers\.\d+)"

MIXTRAL = Layout(
    name="mixtral",
    architecture="mixtral",
    model_types=("mixtral",),
    parts=("w1", "w2", "w3"),
    expert_kind="gated",
    activation_key="hidden_act",
    expert_pattern=_MIXTRAL_LAYER + r"\.block_sparse_moe\.experts\.(?P<expert>\d+)\.(?P<part>w1|w2|w3)\.weight",
    expert_template="{layer}.block_sparse_moe.experts.{expert}.{part}.weight",
    router_pattern=_MIXTRAL_LAYER + r"\.block_sparse_moe\.gate\.weight",
    renames=(("{layer}.block_sparse_moe.gate.weight", "{layer}.mlp.gate.weight"),),
)

MIXTRAL_FUSED = Layout(
    name="mixtral-fused",
    architecture="mixtral",
    model_types=("mixtral",),
    parts=("w1", "w2", "w3"),
    expert_kind="gated",
    activation_key="hidden_act",
    fused_pattern=_MIXTRAL_LAYER + r"\.mlp\.experts\.(?P<fused>gate_up_proj|down_proj)",
    fused_template="{layer}.mlp.experts.{fused}",
    fused_parts={"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)},
    router_pattern=_MIXTRAL_LAYER + r"\.mlp\.gate\.weight",
)

_SWITCH_LAYER = r"(?P<layer>(?:encoder|decoder)\.block\.\d+\.layer\.\d+)"

SWITCH = Layout(
    name="switch",
    architecture="switch_transformers",
    model_types=("switch_transformers",),
    parts=("wi", "wo"),
    expert_kind="dense",
    activation_key="dense_act_fn",
    expert_pattern=_SWITCH_LAYER + r"\.mlp\.experts\.expert_(?P<expert>\d+)\.(?P<part>wi|wo)\.weight",
    expert_template="{layer}.mlp.experts.expert_{expert}.{part}.weight",
    router_pattern=_SWITCH_LAYER + r"\.mlp\.router\.classifier\.weight",
)

LAYOUTS: tuple[Layout, ...] = (MIXTRAL, MIXTRAL_FUSED, SWITCH)


def layout_by_name(name: str) -> Layout:
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    raise KeyError(name)


def detect_layout(tensor_names: list[str], model_type: str | None) -> Layout | None:
    """The layout whose expert tensors appear in `tensor_names` (None if no layout fits)."""
    for layout in LAYOUTS:
        if model_type is not None and model_type not in layout.model_types:
            continue
        if any(layout.match_expert(n) or layout.match_fused(n) for n in tensor_names):
            return layout
    return None
