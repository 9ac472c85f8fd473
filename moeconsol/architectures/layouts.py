"""What each architecture's tensor names mean, kept as data: one `Architecture` record each.

`ARCHITECTURES` is the registry. A record says what cannot be derived: the transformers
classes, how an expert computes (`ExpertKind`) and which canonical part plays which role,
the router's name and format, what is shared (always-on) experts. Its `layouts` are the
on-disk naming schemes of its checkpoints. For the families on transformers 5's common
experts interface (`use_experts_implementation`: `gate_up_proj` [E, 2I, H] = cat(gate, up)
and `down_proj` [E, H, I] in memory), the layouts are *derived* from transformers' own
checkpoint conversion mapping (`get_checkpoint_conversion_mapping(model_type)`): which
per-expert tensors are concatenated into which fused one, in which order, and which module
renames apply. Switch Transformers predates that interface; its layout is written here.

Adding a family is one record in `ARCHITECTURES` plus one row in `tests/test_families.py`.

Expert parts are always handled in a *canonical* form: one 2-D matrix per part, exactly as
the per-expert checkpoints store it (Mixtral `w1` [I, H], `w2` [H, I], `w3` [I, H]; Qwen,
OLMoE, DeepSeek `gate_proj` [I, H], `down_proj` [H, I], `up_proj` [I, H]; Switch `wi` [F, D],
`wo` [D, F]). Fused layouts store all experts of a layer in one 3-D tensor whose dim 1
concatenates several parts; `fused_parts` says which.

Shared (always-on) experts (Qwen2-MoE `shared_expert`, DeepSeek `shared_experts`) are kept
with the non-expert tensors: they are one FFN per layer that every token uses, stored once
across variants when bit-identical (as every non-expert tensor is), swapped with the rest.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from pathlib import Path
from typing import TypedDict

from . import derived_layouts as shipped


class ExpertKind(str, Enum):
    GATED = "gated"
    """down(act(gate x) * up x): roles gate, up, down"""
    CLAMPED_SWIGLU = "clamped-swiglu"
    """gpt-oss: g = clamp(gate x + b_g, max=L), u = clamp(up x + b_u, -L, L),
    down(((u + 1) * g * sigmoid(alpha g)) + b_d; alpha, L from config `swiglu_alpha`, `swiglu_limit`"""
    DENSE = "dense"
    """out(act(in x)): roles in, out"""


class RouterFormat(str, Enum):
    TOP_K = "top-k"
    """the experts module receives (hidden [T, H], expert index [T, k], weight [T, k])"""
    ONE_HOT = "one-hot"
    """Switch: (hidden, capacity-masked one-hot [T, 1, E], probability [T, 1])"""


class FusedCodec(str, Enum):
    """How one expert's slice of a fused tensor (all experts of a layer, expert index first)
    holds its canonical parts."""

    ROWS = "rows"
    """Parts concatenated along the slice's first dim (Mixtral `gate_up_proj` [E, 2I, H] =
    cat(w1, w3)): every canonical part is one contiguous byte range on disk."""
    INTERLEAVED_T = "interleaved-transposed"
    """gpt-oss: the slice is the transposed matrix [in, n*out] with the n parts interleaved
    on its last dim (gate_up_proj[e][:, 0::2] = gate.T, [:, 1::2] = up.T); a bias slice
    [n*out] interleaves the same way and its canonical part is [1, out]. Parts are strided:
    they are read as tensors, never as byte ranges."""
    WHOLE = "whole"
    """One part per fused tensor, the expert's whole slice, of any rank (gpt-oss MXFP4's
    `gate_up_proj_blocks` [E, 2I, G, 16]): one contiguous byte range per expert."""


def part_shape(codec: FusedCodec, slice_shape: tuple[int, ...], n: int) -> tuple[int, ...]:
    """Canonical shape of one of the n parts in an expert slice of this shape."""
    if codec is FusedCodec.WHOLE:
        return tuple(slice_shape)
    if codec is FusedCodec.ROWS:
        return (slice_shape[0] // n, *slice_shape[1:])
    return (slice_shape[1] // n, slice_shape[0]) if len(slice_shape) == 2 else (1, slice_shape[0] // n)


def fused_shape(codec: FusedCodec, parts: list[tuple[int, ...]], experts: int) -> tuple[int, ...]:
    """Shape of the fused tensor holding these canonical parts for every expert."""
    if codec is FusedCodec.WHOLE:
        return (experts, *parts[0])
    if codec is FusedCodec.ROWS:
        return (experts, sum(p[0] for p in parts), *parts[0][1:])
    rows, cols = parts[0]
    return (experts, len(parts) * cols) if rows == 1 else (experts, cols, len(parts) * rows)


def slice_ok(codec: FusedCodec, shape: tuple[int, ...], n: int) -> bool:
    """Whether a fused tensor of this shape can hold n parts per expert."""
    if codec is FusedCodec.WHOLE:
        return len(shape) >= 2 and n == 1
    if codec is FusedCodec.ROWS:
        return len(shape) == 3 and shape[1] % n == 0
    return len(shape) in (2, 3) and shape[-1] % n == 0


def split(codec: FusedCodec, piece, n: int) -> list:
    """One expert's slice -> its n canonical parts (views)."""
    if codec is FusedCodec.WHOLE:
        return [piece]
    if codec is FusedCodec.ROWS:
        return list(piece.chunk(n, dim=0))
    if piece.dim() == 1:
        return [piece[k::n].unsqueeze(0) for k in range(n)]
    return [piece[:, k::n].T for k in range(n)]


def join(codec: FusedCodec, parts: list):
    """Inverse of `split`: canonical parts -> one expert's slice (a new tensor)."""
    import torch

    if codec is FusedCodec.WHOLE:
        return parts[0]
    if codec is FusedCodec.ROWS:
        return torch.cat(parts, dim=0)
    if parts[0].shape[0] == 1:
        return torch.stack([p[0] for p in parts], dim=-1).reshape(-1)
    return torch.stack([p.T for p in parts], dim=-1).reshape(parts[0].shape[1], -1)


class BankKind(str, Enum):
    FUSED = "fused"
    """transformers 5's experts interface: `gate_up_proj`, `down_proj` over all experts"""
    MODULES = "modules"
    """one submodule per expert (`expert_{j}`), Switch Transformers"""


@dataclass(frozen=True)
class Layout:
    name: str
    """Layout id recorded in reports and artifacts: "mixtral", "mixtral-fused", "switch"."""
    architecture: str
    """Models of the same architecture can be consolidated together, whatever their layout."""
    parts: tuple[str, ...]
    """Canonical expert parts, in the order used to flatten an expert into one vector."""
    expert_pattern: str | None = None
    """Regex of a per-expert tensor, with groups `layer`, `expert`, `part`."""
    expert_template: str | None = None
    fused_pattern: str | None = None
    """Regex of a fused tensor holding all experts of a layer, groups `layer`, `fused`."""
    fused_template: str | None = None
    fused_parts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Fused tensor name -> the canonical parts each expert's slice holds, in order."""
    fused_codec: FusedCodec = FusedCodec.ROWS
    """How a slice holds its parts."""
    router_pattern: str = ""
    """Regex of a router weight, group `layer`."""
    renames: tuple[tuple[str, str], ...] = ()
    """(on-disk template, in-memory template): names transformers 5 uses for non-expert tensors."""
    quant: str | None = None
    """The quantization_config `quant_method` of checkpoints in this layout (`io/quant`): its
    parts are what is stored (codes and scales), not values."""
    base: str | None = None
    """For a quantized layout: the layout whose parts its parts dequantize to (the values)."""

    @property
    def contiguous(self) -> bool:
        """Every canonical part is one contiguous byte range of its file (`Checkpoint.part_info`);
        otherwise parts are read as tensors and hashed and written from memory."""
        return self.fused_codec in (FusedCodec.ROWS, FusedCodec.WHOLE)

    @property
    def record(self) -> Architecture:
        return architecture(self.architecture)

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


@dataclass(frozen=True)
class Architecture:
    """Everything moeconsol knows about one MoE family that transformers cannot tell it."""

    name: str
    """config.json `model_type`; recorded in reports and artifacts as `architecture`."""
    label: str
    """Human name, for messages and docs."""
    config_class: str
    model_class: str
    """transformers classes (the model class generates: causal LM or seq2seq)."""
    kind: ExpertKind
    roles: dict[str, str]
    """role (gate/up/down, or in/out) -> canonical part name"""
    activation_key: str = "hidden_act"
    """config key naming the expert activation function"""
    bank: BankKind = BankKind.FUSED
    router: str = "gate"
    """in-memory name of the router module inside the MoE block (`{layer}.mlp.{router}`)"""
    router_format: RouterFormat = RouterFormat.TOP_K
    router_dtype_key: str | None = None
    """Config key of the dtype the router computes in when it casts its own weights to it at
    every forward (Switch: `router_dtype`). The runtime holds them in that dtype from the
    start, so the cast is a no-op and swaps keep reaching them."""
    encoder_decoder: bool = False
    layer_pattern: str = r"model\.layers\.\d+"
    """Regex of a decoder layer prefix that may hold an MoE block (`{layer}.mlp`)."""
    shared_experts: str | None = None
    """Name of the always-on expert module in the MoE block, if any (kept with the
    non-expert tensors; see the module docstring)."""
    explicit_layouts: tuple[Layout, ...] = ()
    """Layouts written by hand; empty: derived from transformers' conversion mapping."""

    @property
    def layouts(self) -> tuple[Layout, ...]:
        """The layouts of unquantized checkpoints (values on disk)."""
        return tuple(x for x in self.stored_layouts if x.quant is None)

    @property
    def stored_layouts(self) -> tuple[Layout, ...]:
        """Every layout, those of quantized releases (`Layout.quant`) included."""
        return self.explicit_layouts or _derived_layouts(self.name)

    @property
    def parts(self) -> tuple[str, ...]:
        return self.layouts[0].parts

    @property
    def memory_layout(self) -> Layout | None:
        """The fused layout whose tensor names are the in-memory parameters of transformers'
        experts module (None for `BankKind.MODULES`)."""
        return next((x for x in self.layouts if x.fused_parts), None)

    def part(self, role: str) -> str:
        return self.roles[role]

    def transformers_classes(self) -> tuple[type, type]:
        """(config class, model class) of this architecture, from transformers (imported here)."""
        import transformers

        return getattr(transformers, self.config_class), getattr(transformers, self.model_class)


class ConversionFacts(TypedDict):
    """What `_derived_layouts` reads from transformers' conversion mapping for one model_type."""

    module: str
    """On-disk name of the MoE block module: "mlp", Mixtral's "block_sparse_moe"."""
    fused: dict[str, tuple[str, ...]]
    """Fused tensor -> the per-expert parts concatenated into it, in order."""


def derive_facts(name: str) -> ConversionFacts:
    """The conversion facts of one family, read from the installed transformers (imports
    `transformers.conversion_mapping`: over a second)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    fused: dict[str, tuple[str, ...]] = {}
    module = "mlp"
    for t in get_checkpoint_conversion_mapping(name) or []:
        if isinstance(t, WeightConverter) and any("experts" in p for p in t.target_patterns):
            target = t.target_patterns[0].rsplit(".", 1)[1]
            fused[target] = tuple(re.fullmatch(r".*experts\.\*\.(\w+)\.weight", s)[1] for s in t.source_patterns)
        elif isinstance(t, WeightRenaming) and t.target_patterns == [".mlp."]:
            module = t.source_patterns[0].strip(".")
    return {"module": module, "fused": fused}


@cache
def _transformers_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def conversion_facts(name: str) -> ConversionFacts:
    """The conversion facts of one family: the copy shipped in `derived_layouts.py` when the
    installed transformers is the version it was derived from (no transformers import),
    else derived from the installed transformers (`derive_facts`)."""
    if _transformers_version() == shipped.TRANSFORMERS_VERSION and name in shipped.FACTS:
        return shipped.FACTS[name]
    return derive_facts(name)


def derived_families() -> list[str]:
    """The families whose layouts are derived from transformers' conversion mapping."""
    return [a.name for a in ARCHITECTURES if not a.explicit_layouts]


def regenerate(path: Path | None = None) -> Path:
    """Write `derived_layouts.py` from the installed transformers (`python -m moeconsol.architectures.layouts
    --regenerate`); run it after upgrading transformers."""
    path = path or Path(__file__).with_name("derived_layouts.py")
    facts = {name: derive_facts(name) for name in derived_families()}
    lines = [
        '"""Generated by `python -m moeconsol.architectures.layouts --regenerate`; do not edit.',
        "",
        "The facts `layouts._derived_layouts` reads from transformers' checkpoint conversion mapping",
        "(`layouts.derive_facts`), per model_type, as derived from the transformers version below;",
        "with that version installed they are used as they are, without importing transformers.",
        '"""',
        "",
        f"TRANSFORMERS_VERSION = {_transformers_version()!r}",
        "",
        "FACTS = {",
        *(f"    {name!r}: {fact!r}," for name, fact in facts.items()),
        "}",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


@cache
def _derived_layouts(name: str) -> tuple[Layout, ...]:
    """The per-expert and the fused layout of a family on transformers 5's experts interface,
    from transformers' checkpoint conversion mapping for its model_type (`conversion_facts`)."""
    arch = architecture(name)
    facts = conversion_facts(arch.name)
    fused, module = facts["fused"], facts["module"]
    want = {"gate_up_proj": (arch.roles["gate"], arch.roles["up"]), "down_proj": (arch.roles["down"],)}
    if fused != want:
        raise RuntimeError(f"transformers' conversion mapping for {arch.name} is {fused}, moeconsol expects {want}")
    parts = (arch.roles["gate"], arch.roles["down"], arch.roles["up"])
    layer = f"(?P<layer>{arch.layer_pattern})"
    alternatives = "|".join(parts)
    renames = (
        ()
        if module == "mlp"
        else ((f"{{layer}}.{module}.{arch.router}.weight", f"{{layer}}.mlp.{arch.router}.weight"),)
    )
    per_expert = Layout(
        name=arch.name,
        architecture=arch.name,
        parts=parts,
        expert_pattern=layer + rf"\.{module}\.experts\.(?P<expert>\d+)\.(?P<part>{alternatives})\.weight",
        expert_template=f"{{layer}}.{module}.experts.{{expert}}.{{part}}.weight",
        router_pattern=layer + rf"\.{module}\.{arch.router}\.weight",
        renames=renames,
    )
    fused_layout = Layout(
        name=f"{per_expert.name}-fused",
        architecture=arch.name,
        parts=parts,
        fused_pattern=layer + r"\.mlp\.experts\.(?P<fused>gate_up_proj|down_proj)",
        fused_template="{layer}.mlp.experts.{fused}",
        fused_parts=want,
        router_pattern=layer + rf"\.mlp\.{arch.router}\.weight",
    )
    stored = tuple(f"{p}{suffix}" for suffix in (".weight", ".weight_scale_inv") for p in parts)
    fp8 = Layout(
        name=f"{per_expert.name}-fp8",
        architecture=arch.name,
        parts=stored,
        expert_pattern=layer
        + rf"\.{module}\.experts\.(?P<expert>\d+)\.(?P<part>(?:{alternatives})\.(?:weight|weight_scale_inv))",
        expert_template=f"{{layer}}.{module}.experts.{{expert}}.{{part}}",
        router_pattern=per_expert.router_pattern,
        renames=renames,
        quant="fp8",
        base=per_expert.name,
    )
    return per_expert, fused_layout, fp8


_QWEN_ROLES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_GPT_OSS_ROLES = {
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
    "gate_bias": "gate_proj_bias",
    "up_bias": "up_proj_bias",
    "down_bias": "down_proj_bias",
}
_GPT_OSS_MXFP4 = (
    "gate_up_proj_blocks",
    "gate_up_proj_scales",
    "gate_up_proj_bias",
    "down_proj_blocks",
    "down_proj_scales",
    "down_proj_bias",
)
"""gpt-oss MXFP4 releases: each fused tensor is one stored part (`FusedCodec.WHOLE`)."""
_SWITCH_LAYER = r"(?P<layer>(?:encoder|decoder)\.block\.\d+\.layer\.\d+)"

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "mixtral",
        "Mixtral",
        "MixtralConfig",
        "MixtralForCausalLM",
        ExpertKind.GATED,
        {"gate": "w1", "up": "w3", "down": "w2"},
    ),
    Architecture(
        "qwen2_moe",
        "Qwen2-MoE",
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        ExpertKind.GATED,
        _QWEN_ROLES,
        shared_experts="shared_expert",
    ),
    Architecture("qwen3_moe", "Qwen3-MoE", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", ExpertKind.GATED, _QWEN_ROLES),
    Architecture("olmoe", "OLMoE", "OlmoeConfig", "OlmoeForCausalLM", ExpertKind.GATED, _QWEN_ROLES),
    Architecture(
        "deepseek_v2",
        "DeepSeek-V2",
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        ExpertKind.GATED,
        _QWEN_ROLES,
        shared_experts="shared_experts",
    ),
    Architecture(
        "deepseek_v3",
        "DeepSeek-V3",
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        ExpertKind.GATED,
        _QWEN_ROLES,
        shared_experts="shared_experts",
    ),
    Architecture(
        "gpt_oss",
        "gpt-oss",
        "GptOssConfig",
        "GptOssForCausalLM",
        ExpertKind.CLAMPED_SWIGLU,
        _GPT_OSS_ROLES,
        router="router",
        explicit_layouts=(
            Layout(
                name="gpt_oss",
                architecture="gpt_oss",
                parts=("gate_proj", "down_proj", "up_proj", "gate_proj_bias", "down_proj_bias", "up_proj_bias"),
                fused_pattern=r"(?P<layer>model\.layers\.\d+)\.mlp\.experts\.(?P<fused>gate_up_proj|gate_up_proj_bias|down_proj|down_proj_bias)",
                fused_template="{layer}.mlp.experts.{fused}",
                fused_parts={
                    "gate_up_proj": ("gate_proj", "up_proj"),
                    "gate_up_proj_bias": ("gate_proj_bias", "up_proj_bias"),
                    "down_proj": ("down_proj",),
                    "down_proj_bias": ("down_proj_bias",),
                },
                fused_codec=FusedCodec.INTERLEAVED_T,
                router_pattern=r"(?P<layer>model\.layers\.\d+)\.mlp\.router\.weight",
            ),
            Layout(
                name="gpt_oss-mxfp4",
                architecture="gpt_oss",
                parts=_GPT_OSS_MXFP4,
                fused_pattern=rf"(?P<layer>model\.layers\.\d+)\.mlp\.experts\.(?P<fused>{'|'.join(_GPT_OSS_MXFP4)})",
                fused_template="{layer}.mlp.experts.{fused}",
                fused_parts={p: (p,) for p in _GPT_OSS_MXFP4},
                fused_codec=FusedCodec.WHOLE,
                router_pattern=r"(?P<layer>model\.layers\.\d+)\.mlp\.router\.weight",
                quant="mxfp4",
                base="gpt_oss",
            ),
        ),
    ),
    Architecture(
        "switch_transformers",
        "Switch Transformers",
        "SwitchTransformersConfig",
        "SwitchTransformersForConditionalGeneration",
        ExpertKind.DENSE,
        {"in": "wi", "out": "wo"},
        activation_key="dense_act_fn",
        bank=BankKind.MODULES,
        router="router.classifier",
        router_format=RouterFormat.ONE_HOT,
        router_dtype_key="router_dtype",
        encoder_decoder=True,
        layer_pattern=r"(?:encoder|decoder)\.block\.\d+\.layer\.\d+",
        explicit_layouts=(
            Layout(
                name="switch",
                architecture="switch_transformers",
                parts=("wi", "wo"),
                expert_pattern=_SWITCH_LAYER + r"\.mlp\.experts\.expert_(?P<expert>\d+)\.(?P<part>wi|wo)\.weight",
                expert_template="{layer}.mlp.experts.expert_{expert}.{part}.weight",
                router_pattern=_SWITCH_LAYER + r"\.mlp\.router\.classifier\.weight",
            ),
        ),
    ),
)


def architecture(name: str) -> Architecture:
    for arch in ARCHITECTURES:
        if arch.name == name:
            return arch
    raise KeyError(name)


def supported() -> str:
    """The families moeconsol knows, for messages."""
    return ", ".join(a.label for a in ARCHITECTURES)


def all_layouts() -> tuple[Layout, ...]:
    return tuple(layout for arch in ARCHITECTURES for layout in arch.stored_layouts)


def layout_by_name(name: str) -> Layout:
    for layout in all_layouts():
        if layout.name == name:
            return layout
    raise KeyError(name)


def detect_layout(tensor_names: list[str], model_type: str | None, quant: str | None = None) -> Layout | None:
    """The layout whose expert tensors appear in `tensor_names` (None if no layout fits), among
    the layouts of quantization method `quant` (None: unquantized)."""
    for arch in ARCHITECTURES:
        if model_type is not None and model_type != arch.name:
            continue
        for layout in arch.stored_layouts:
            if layout.quant != quant:
                continue
            if any(layout.match_expert(n) or layout.match_fused(n) for n in tensor_names):
                return layout
    return None


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python -m moeconsol.architectures.layouts --regenerate")
    print(f"wrote {regenerate()}")
