"""Property-based tests (hypothesis): the safetensors header parser and the manifest
validator, given arbitrary bytes or arbitrary JSON, never crash (only SafetensorsError /
ArtifactError), never hang, and never read outside the file they were given; every reader
of an artifact refuses exactly what `verify` finds damaged."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from moeconsol.artifact.corrections import FORMATS
from moeconsol.artifact.manifest import FORMAT, FORMAT_VERSION, Manifest
from moeconsol.errors import ArtifactError, SafetensorsError
from moeconsol.io.safetensors_file import read_header, read_tensor, torch_dtypes

FAST = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def header_file(header: object, data: bytes, path: Path, length: int | None = None) -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def check_parse(path: Path) -> None:
    """Either a clean SafetensorsError, or tensors that all lie inside the file and read back."""
    size = path.stat().st_size
    try:
        tensors, metadata = read_header(path)
    except SafetensorsError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    for info in tensors.values():
        assert 8 <= info.start <= info.end <= size
        t = read_tensor(info)
        assert tuple(t.shape) == info.shape and t.dtype == torch_dtypes()[info.dtype]


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        path.write_bytes(data)
        check_parse(path)


@FAST
@given(st.binary(max_size=200), st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_arbitrary_header_bytes_and_length_never_crash(header, length, data):
    with tempfile.TemporaryDirectory() as d:
        check_parse(header_file(header, data, Path(d) / "x.safetensors", length))


@FAST
@given(json_values, st.binary(max_size=64))
def test_arbitrary_json_header_never_crashes(header, data):
    with tempfile.TemporaryDirectory() as d:
        check_parse(header_file(header, data, Path(d) / "x.safetensors"))


entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*torch_dtypes(), "F128", "", 3]),
        "shape": st.lists(st.integers(-2, 5) | st.just(2.0) | st.just("2"), max_size=3),
        "data_offsets": st.lists(st.integers(-4, 80) | st.just("0"), min_size=0, max_size=3),
    }
)


@FAST
@given(
    st.dictionaries(st.text(max_size=6), entries | json_values, max_size=4),
    st.binary(max_size=80),
    st.one_of(st.none(), json_values),
)
def test_header_like_json_never_crashes_nor_reads_outside(header, data, metadata):
    """Headers close to valid ones (typed entries with wrong values, overlapping offsets,
    offsets past the end): every tensor accepted lies inside the file."""
    if metadata is not None:
        header["__metadata__"] = metadata
    with tempfile.TemporaryDirectory() as d:
        check_parse(header_file(header, data, Path(d) / "x.safetensors"))


@FAST
@given(
    st.lists(
        st.tuples(st.sampled_from(["F32", "F16", "U8"]), st.lists(st.integers(0, 4), max_size=3)),
        min_size=1,
        max_size=4,
    )
)
def test_valid_files_parse_exactly(specs):
    """Files written by the safetensors library itself always parse, to the same tensors."""
    from safetensors.torch import load_file, save_file

    tensors = {f"t{i}": torch.zeros(shape, dtype=torch_dtypes()[dtype]) for i, (dtype, shape) in enumerate(specs)}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        save_file(tensors, path, metadata={"format": "pt"})
        parsed, metadata = read_header(path)
        assert metadata == {"format": "pt"}
        expected = load_file(path)
        assert sorted(parsed) == sorted(expected)
        for name, info in parsed.items():
            assert torch.equal(read_tensor(info), expected[name])


# -- manifest -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_manifest(small_family) -> dict:
    return json.loads((small_family / "art" / "manifest.json").read_text())


def check_manifest(data: object) -> None:
    try:
        m = Manifest.from_json(data)
    except ArtifactError:
        return
    # accepted: every path in it is relative and stays inside the artifact
    root = Path("/artifact")
    paths = list(m.files) + list(m.weight_map.values())
    paths += [f"models/{x.name}/{f}" for x in m.models for f in x.files]
    paths += [f"out/{f}" for x in m.models for f in x.source_shards]
    for p in paths:
        resolved = (root / p).resolve()
        assert resolved == root or root in resolved.parents, p


@FAST
@given(json_values)
def test_arbitrary_json_manifest_never_crashes(data):
    check_manifest(data)
    if isinstance(data, dict):
        check_manifest({**data, "format": FORMAT, "format_version": FORMAT_VERSION})


@FAST
@given(st.data())
def test_mutated_real_manifest_never_crashes(real_manifest, data):
    """Replace one value anywhere in a real manifest by arbitrary JSON."""
    manifest = json.loads(json.dumps(real_manifest))
    node, key = _random_slot(manifest, data)
    node[key] = data.draw(json_values | st.sampled_from(["../x", "/etc/passwd", "a/../../b", "", ".", "models/../.."]))
    check_manifest(manifest)


def _random_slot(root: dict, data) -> tuple:
    """A random (container, key) inside `root`, walking down a few levels."""
    node, key = root, data.draw(st.sampled_from(sorted(root)))
    for _ in range(data.draw(st.integers(0, 4))):
        child = node[key]
        if isinstance(child, dict) and child:
            node, key = child, data.draw(st.sampled_from(sorted(child)))
        elif isinstance(child, list) and child:
            node, key = child, data.draw(st.integers(0, len(child) - 1))
        else:
            break
    return node, key


def test_manifest_round_trip_and_strict_json(real_manifest):
    """The reader's type gives back exactly what the writer wrote; NaN is never written."""
    from moeconsol.errors import MoeconsolError

    m = Manifest.from_json(real_manifest)
    assert m.to_json() == real_manifest
    assert json.loads(m.dumps()) == real_manifest
    bad = json.loads(json.dumps(real_manifest))
    bad["layers"][0]["bank"][0]["weights"] = [float("nan")] * len(bad["layers"][0]["bank"][0]["members"])
    with pytest.raises(ArtifactError, match="finite number"):
        Manifest.from_json(bad)
    from dataclasses import replace

    with pytest.raises(MoeconsolError, match="NaN"):
        replace(m, consolidation={**m.consolidation, "scale": float("nan")}).dumps()


@settings(max_examples=100, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_commands_on_a_mutated_manifest_never_crash_nor_write_outside(
    real_manifest, small_family, tmp_path_factory, data
):
    """Every reader of an artifact (open, inspect's summary, verify, export, tensor reads)
    on a real artifact whose manifest had one value replaced: only MoeconsolError, and
    nothing is written outside the export's own directory."""
    from moeconsol.artifact.export import export_model
    from moeconsol.artifact.reader import Artifact, summary
    from moeconsol.artifact.verify import verify_artifact
    from moeconsol.errors import MoeconsolError

    root = tmp_path_factory.mktemp("mutated")
    art = Path(shutil.copytree(small_family / "art", root / "art"))
    manifest = json.loads(json.dumps(real_manifest))
    node, key = _random_slot(manifest, data)
    node[key] = data.draw(
        json_values | st.sampled_from(["../x", "/etc/passwd", "a/../../b", "switch", "F16", [0, 0], [[0, 1]]])
    )
    (art / "manifest.json").write_text(json.dumps(manifest))
    (root / "out").mkdir()
    before = sorted(p.relative_to(root) for p in root.rglob("*") if p != root / "out")
    try:
        a = Artifact.open(art)
        summary(a)
        verify_artifact(art)
        for name in a.model_names:
            export_model(art, name, root / "out" / name)
            for key in a.non_expert_keys(name).values():
                a.read(key)
        event("accepted and exported")
    except MoeconsolError as e:
        event(type(e).__name__)
    after = sorted(p.relative_to(root) for p in root.rglob("*") if not str(p.relative_to(root)).startswith("out"))
    assert after == before
    shutil.rmtree(root)


def test_deeply_nested_json_is_refused_not_a_crash(tmp_path):
    """The edge a generator rarely reaches: JSON nested deeper than Python's recursion limit."""
    deep = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(SafetensorsError, match="not JSON"):
        read_header(header_file(deep, b"", tmp_path / "x.safetensors"))
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_bytes(deep)
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Manifest.read(art / "manifest.json")


# -- corrections: the runtime and export refuse exactly what verify finds ----------------------


@pytest.fixture(scope="module")
def corrected(tmp_path_factory) -> Path:
    """Three tiny Mixtral fine-tunes merged calibrated with corrections of every format the
    planner picks (`--deltas`)."""
    from builders import correction_family, merge_with_corrections

    fam = correction_family(tmp_path_factory.mktemp("corrected"), "mixtral")
    merge_with_corrections(fam, fam["root"] / "art")
    return fam["root"] / "art"


def _delta_mutation(manifest: dict, data) -> tuple:
    """A random delta entry's field, one of its components' keys, or the dtype or shape
    `shapes` gives one of its components: (container, key, values worth trying there; any
    JSON now and then)."""
    entries = [x for e in manifest["layers"] for items in e.get("deltas", {}).values() for x in items]
    x = data.draw(st.sampled_from(entries))
    part = data.draw(st.sampled_from(sorted(x["keys"])))
    comp = data.draw(st.sampled_from(sorted(x["keys"][part])))
    stored = manifest["shapes"][x["keys"][part][comp]]
    numbers = st.integers(-1, 70) | st.sampled_from([None, 10**9])
    keys = st.sampled_from(sorted(k for k in manifest["weight_map"] if k.startswith("delta.")))
    node, key, values = data.draw(
        st.sampled_from(
            [
                (x, "expert", numbers),
                (x, "bank", numbers),
                (x, "size", numbers),
                (x, "format", st.sampled_from(list(FORMATS))),
                (x["keys"][part], comp, keys),
                (stored, "dtype", st.sampled_from(["F16", "F32", "BF16", "U8", "I8"])),
                (stored, "shape", st.lists(st.integers(0, 70), min_size=1, max_size=3)),
            ]
        )
    )
    return node, key, data.draw(values | json_values if data.draw(st.integers(0, 9)) == 0 else values)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_every_reader_refuses_exactly_what_verify_finds_in_a_mutated_delta(corrected, tmp_path_factory, data):
    """One value of a delta entry (or of what `shapes` says of one of its components)
    replaced: the runtime, export and a tensor read refuse the artifact with a MoeconsolError
    exactly when verify lists a problem or refuses the manifest; what verify passes, they
    serve."""
    from moeconsol.artifact.export import export_model
    from moeconsol.artifact.reader import Artifact
    from moeconsol.artifact.verify import verify_artifact
    from moeconsol.errors import MoeconsolError
    from moeconsol.serving.runtime import Runtime

    root = tmp_path_factory.mktemp("mutated-delta")
    art = Path(shutil.copytree(corrected, root / "art"))
    manifest = json.loads((art / "manifest.json").read_text())
    node, key, value = _delta_mutation(manifest, data)
    node[key] = value
    weight_keys = sorted(k for k in manifest["weight_map"] if k.startswith("delta."))
    (art / "manifest.json").write_text(json.dumps(manifest))
    try:
        damaged = bool(verify_artifact(art))
    except MoeconsolError:
        damaged = True
    readers = {
        "runtime": lambda: Runtime.from_artifact(art).activate(Artifact.open(art).model_names[-1]),
        "export": lambda: export_model(art, Artifact.open(art).model_names[0], root / "out"),
        "read": lambda: [Artifact.open(art).read(k) for k in weight_keys],
    }
    for name, read in readers.items():
        try:
            read()
            refused = False
        except MoeconsolError:
            refused = True
        assert refused == damaged, (name, node, key, node[key])
    event("damaged" if damaged else "accepted")
    shutil.rmtree(root)
