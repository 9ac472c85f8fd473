"""The one validator of an artifact's tensors: what every stored tensor the manifest refers to
must be, judged from the manifest alone (no file is read).

- every bank expert of every layer stored, part by part, with its part's shape and the
  artifact's expert dtype (a quantized release's codes and scales: `part_dtypes`; an
  unquantized fine-tune's own expert beside them: `value_parts`);
- every slot map of every layer inside its bank;
- every delta component stored with exactly the dtype and shape its format gives for its
  part's shape and the delta's size (`corrections.FORMATS`);
- every non-expert tensor a model names stored; every stored key in a listed file; every
  encoded key and its reference stored.

`Manifest.from_json` has refused what is malformed on its own (types, paths, and a delta's
format, size, expert and bank indices, parts and component names). Files are checked against
`shapes` when first read (`reader.check_files`: size, sha256, every header entry's dtype and
shape), so together the two say that every tensor a reader returns is what its format needs.

`problems` is what `verify` lists; `Artifact.validate`, which every tensor read goes through
(the runtime, eval, export, serve), raises `DamagedArtifactError` with the first of them.
"""

from __future__ import annotations

from ..io.safetensors_file import dtype_names, torch_dtypes
from .corrections import FORMATS
from .manifest import DeltaEntry, LayerEntry, Manifest, TensorEntry


def bank_key(layer: str, k: int, part: str) -> str:
    """Stored name of part `part` of bank expert `k` of `layer` as merge writes it."""
    return f"bank.{layer}.{k}.{part}"


def bank_part_key(layer: str, k: int, key: str | None, part: str) -> str:
    """Stored name of part `part` of bank entry `k`: under the entry's own `key` (entries
    that `add` or `remove` moved), else merge's `bank_key`."""
    return bank_key(layer, k, part) if key is None else f"{key}.{part}"


def read_as(spec: Manifest, key: str) -> TensorEntry | None:
    """The dtype and shape reading `key` gives (an encoded key: what it decodes to); None
    when it is not stored."""
    if key not in spec.weight_map:
        return None
    encoding = spec.encodings.get(key)
    if encoding is not None:
        return TensorEntry(encoding.dtype, encoding.shape)
    return spec.shapes.get(key)


def problems(spec: Manifest) -> list[str]:
    """Everything wrong with the tensors the manifest refers to (empty: all is well)."""
    out = storage_problems(spec)
    for entry in spec.layers:
        out += layer_problems(spec, entry)
    for model in spec.models:
        out += [
            f"model {model.name!r}: tensor {tensor} (stored as {key}) is not stored"
            for tensor, key in model.tensors.items()
            if key not in spec.weight_map
        ]
    return out


def storage_problems(spec: Manifest) -> list[str]:
    """Every stored key in a file the manifest lists; every encoded key and its reference stored."""
    out = [
        f"tensor {key}: stored in {file}, which the manifest does not list"
        for key, file in spec.weight_map.items()
        if file not in spec.files
    ]
    for key, encoding in spec.encodings.items():
        if key not in spec.weight_map:
            out.append(f"tensor {key}: encoded, but not stored")
        if encoding.reference not in spec.weight_map:
            out.append(f"tensor {key}: its reference {encoding.reference} is not stored")
    return out


def layer_problems(spec: Manifest, entry: LayerEntry) -> list[str]:
    """One MoE layer: its bank experts, slot maps and deltas."""
    out = []
    size = len(entry.bank)
    for k, bank_entry in enumerate(entry.bank):
        what = "value_parts" if bank_entry.values else "expert dtype and part shape"
        for part, want in spec.entry_parts(bank_entry).items():
            key = bank_part_key(entry.layer, k, bank_entry.key, part)
            want = TensorEntry(want.dtype, tuple(want.shape))
            got = read_as(spec, key)
            if got is None:
                out.append(f"{entry.layer}: bank expert {k} part {part} ({key}) is not stored")
            elif got != want:
                out.append(
                    f"{_where(spec, key)} is {_text(got)}; as bank expert {k} part {part} it must be {_text(want)} "
                    f"(the manifest's {what})"
                )
    for name, slots in entry.slot_map.items():
        bad = next((e for e, s in enumerate(slots) if not 0 <= s < size), None)
        if len(slots) != spec.experts_per_layer:
            out.append(
                f"{entry.layer}: slot map of {name!r} is out of range: "
                f"{len(slots)} entries, the layer has {spec.experts_per_layer} experts"
            )
        elif bad is not None:
            out.append(
                f"{entry.layer}: slot map of {name!r} is out of range: expert {bad} -> bank entry {slots[bad]}, "
                f"the bank has {size}"
            )
    for name, items in entry.deltas.items():
        for x in items:
            out += delta_problems(spec, entry.layer, name, x)
    return out


def delta_problems(spec: Manifest, layer: str, name: str, x: DeltaEntry) -> list[str]:
    """Every component of one delta stored with the dtype and shape its format gives for its
    part's shape and the delta's size."""
    out = []
    fmt = FORMATS[x.format]
    dtype, names = torch_dtypes()[spec.dtype], dtype_names()
    for part, comps in x.keys.items():
        specs = fmt.components(tuple(spec.part_shapes[part]), x.size, dtype)
        for c, key in comps.items():
            wdtype, wshape = specs[c]
            want = TensorEntry(names[wdtype], tuple(wshape))
            got = read_as(spec, key)
            if got != want:
                out.append(
                    f"{_where(spec, key)} is {_text(got)}; as {x.format} delta component {c} of size {x.size} "
                    f"(model {name!r}, {layer}, expert {x.expert}, part {part}) it must be {_text(want)}"
                )
    return out


def _where(spec: Manifest, key: str) -> str:
    file = spec.weight_map.get(key)
    return f"tensor {key}" if file is None else f"{file}: tensor {key}"


def _text(t: TensorEntry | None) -> str:
    return "not stored" if t is None else f"{t.dtype} {list(t.shape)}"
