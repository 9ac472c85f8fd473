"""Pass 2 of merge: write the planned tensors into the artifact's directory.

With every stored tensor known by name, dtype and shape, each shard writer emits its header
first and then each tensor as it is read (or computed one part at a time: a `mean`
representative, a merging baseline): one expert in memory, never a shard. Three sets of
shards: `bank-*` (the bank), `deltas-*` (compressed corrections, when planned) and
`tensors-*` (non-expert tensors); then each model's side files under models/<name>/.
"""

from __future__ import annotations

from pathlib import Path

from ..artifact import nonexpert_codec as codec
from ..artifact.builder import Written
from ..artifact.corrections import FORMATS, delta_key
from ..artifact.reader import Progress, bank_key
from ..io.checkpoint import Checkpoint, warn_unusual_values
from ..io.safetensors_file import dtype_names, torch_dtypes
from ..io.writer import FileRecord, ShardedWriter, TensorSpec, copy_file
from .nonexpert import EncodedTensor, NonExpertPlan, encode_non_experts, merged_non_expert
from .plan import LayerPlan, delta_components, part_reader, stored_bank_part
from .settings import MergeSettings

HEADER_ALLOWANCE = 256
"""Bytes of safetensors header per tensor assumed when estimating the artifact's size."""


class Steps:
    """The `write` stage's progress: one step per bank entry, delta slot and non-expert tensor."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def step(self) -> None:
        self.done += 1
        if self.progress:
            self.progress("write", self.done, self.total)


def bank_specs(ckpts: list[Checkpoint], plans: list[LayerPlan]) -> list[TensorSpec]:
    """Every part of every bank entry, in the order `write_bank` writes them: the parts of its
    representative's layout (beside a quantized release, an entry holding an unquantized
    fine-tune's own expert stores its values), or of the first model's for a computed entry."""
    E = ckpts[0].num_experts
    specs = []
    for p in plans:
        for k, rep in enumerate(p.representatives):
            c = ckpts[0] if rep is None else ckpts[rep // E]
            specs += [
                TensorSpec(bank_key(p.layer, k, part), c.part_dtype(part), c.expert_shape(part))
                for part in c.layout.parts
            ]
    return specs


def delta_specs(ckpts: list[Checkpoint], plans: list[LayerPlan]) -> list[TensorSpec]:
    """Every delta component of every plan, in the order `write_deltas` writes them."""
    ref = ckpts[0]
    dtype, names = torch_dtypes()[ref.dtype], dtype_names()
    specs = []
    for p in plans:
        for d in p.deltas:
            for part in ref.layout.parts:
                comps = FORMATS[d.format].components(tuple(ref.expert_shape(part)), d.size, dtype)
                for c, (cdtype, shape) in comps.items():
                    specs.append(
                        TensorSpec(
                            delta_key(p.layer, ckpts[d.model].name, d.expert, part, c), names[cdtype], tuple(shape)
                        )
                    )
    return specs


def estimated_bytes(
    ckpts: list[Checkpoint], plans: list[LayerPlan], non_experts: NonExpertPlan, codec_name: str
) -> int:
    """Room the artifact needs while it is written: its tensors and side files, and the
    encoded non-expert versions waiting to be copied in."""
    specs = bank_specs(ckpts, plans) + non_experts.specs + delta_specs(ckpts, plans)
    estimate = sum(x.nbytes + HEADER_ALLOWANCE for x in specs)
    estimate += sum(p.stat().st_size for c in ckpts for p in c.side_files()) + (1 << 20)
    if codec_name != codec.NONE:
        estimate += sum(t.spec.nbytes for t in non_experts.stored if not t.key.endswith("@0"))
    return estimate


def write_artifact(
    tmp: Path,
    ckpts: list[Checkpoint],
    plans: list[LayerPlan],
    non_experts: NonExpertPlan,
    s: MergeSettings,
    base: Checkpoint | None,
    progress: Progress | None = None,
) -> Written:
    """Write the bank, the deltas, the non-expert tensors and the side files into `tmp`."""
    files: dict[str, FileRecord] = {}
    bank_spec, delta_spec, whole_specs = bank_specs(ckpts, plans), delta_specs(ckpts, plans), non_experts.specs
    steps = Steps(progress, sum(len(p.clusters) + len(p.deltas) for p in plans) + len(whole_specs))

    bank = ShardedWriter(tmp, "bank", bank_spec, s.shard_size)
    write_bank(bank, ckpts, plans, base, steps)
    files.update(bank.close())

    delta_map: dict[str, str] = {}
    if delta_spec:
        deltas = ShardedWriter(tmp, "deltas", delta_spec, s.shard_size)
        write_deltas(deltas, ckpts, plans, steps)
        files.update(deltas.close())
        delta_map = deltas.weight_map

    spill = tmp / ".encoded-non-experts"
    encoded: dict[str, EncodedTensor] = {}
    tensor_specs = whole_specs
    if s.non_expert_codec != codec.NONE and non_experts.stored:
        encoded = encode_non_experts(ckpts, non_experts, spill, progress)
        tensor_specs = [
            TensorSpec(x.name, "U8", encoded[x.name].blob.shape) if x.name in encoded else x for x in whole_specs
        ]
    tensors = ShardedWriter(tmp, "tensors", tensor_specs, s.shard_size)
    for spec in non_experts.merged:
        assert non_experts.combine is not None
        tensors.write(spec.name, merged_non_expert(ckpts, base, spec.name.rsplit("@", 1)[0], non_experts.combine))
        steps.step()
    for t in non_experts.stored:
        tensors.copy(t.key, encoded[t.key].blob if t.key in encoded else ckpts[t.model].tensors[t.disk_name])
        steps.step()
    files.update(tensors.close())
    spill.unlink(missing_ok=True)

    side: dict[str, list[str]] = {}
    for c in ckpts:
        (tmp / "models" / c.name).mkdir(parents=True)
        side[c.name] = []
        for p in c.side_files():
            files[f"models/{c.name}/{p.name}"] = copy_file(p, tmp / "models" / c.name / p.name)
            side[c.name].append(p.name)
    return Written(
        files=files,
        weight_map={**bank.weight_map, **delta_map, **tensors.weight_map},
        bank=bank_spec,
        deltas=delta_spec,
        non_experts=tensor_specs,
        non_experts_whole=whole_specs,
        encodings={key: e.encoding for key, e in encoded.items()},
        digests=dict(non_experts.digests),
        side_files=side,
    )


def write_bank(
    writer: ShardedWriter, ckpts: list[Checkpoint], plans: list[LayerPlan], base: Checkpoint | None, steps: Steps
) -> None:
    """Each bank entry's parts: its representative's bytes copied from the source, or its
    values computed one part at a time (a merging baseline, a mean of its members)."""
    E = ckpts[0].num_experts
    parts = ckpts[0].layout.parts
    for p in plans:
        for k, (members, rep) in enumerate(zip(p.clusters, p.representatives)):
            if rep is not None and ckpts[rep // E].layout.contiguous:  # byte ranges of the source: copy the bytes
                for part, info in ckpts[rep // E].expert_infos(p.layer, rep % E).items():
                    writer.copy(bank_key(p.layer, k, part), info)
            elif rep is not None:  # strided parts (gpt-oss): the same bytes, through memory
                for part, tensor in ckpts[rep // E].expert(p.layer, rep % E).items():
                    writer.write(bank_key(p.layer, k, part), tensor)
            else:
                for part in parts:
                    if p.combine is not None:
                        tensors = [ckpts[i // E].expert_part(p.layer, i % E, part) for i in members]
                        for i, t in zip(members, tensors):
                            warn_unusual_values(ckpts[i // E].name, p.layer, i % E, part, t)
                        b = base.expert_part(p.layer, members[0] % E, part) if base is not None else None
                        value = p.combine(tensors, b)
                    else:
                        value = stored_bank_part(part_reader(ckpts, p.layer, part), p, k)
                    writer.write(bank_key(p.layer, k, part), value)
            steps.step()


def write_deltas(writer: ShardedWriter, ckpts: list[Checkpoint], plans: list[LayerPlan], steps: Steps) -> None:
    """Encode each delta slot's parts against its bank entry's stored values, one part in memory."""
    ref = ckpts[0]
    E, dtype = ref.num_experts, torch_dtypes()[ref.dtype]
    for p in plans:
        for d in p.deltas:
            k = p.bank_index(d.model * E + d.expert)
            for part in ref.layout.parts:
                own = ckpts[d.model].expert_part(p.layer, d.expert, part)
                bank = stored_bank_part(part_reader(ckpts, p.layer, part), p, k)
                comps = delta_components(own, bank, d, dtype)
                for c, tensor in comps.items():
                    writer.write(delta_key(p.layer, ckpts[d.model].name, d.expert, part, c), tensor)
            steps.step()
