"""The tables of docs/benchmarks.md that are made from the JSON results in benchmarks/results/.

    python benchmarks/tables.py            # rewrite every generated table of the page in place
    python benchmarks/tables.py --check    # exit 1, naming each table that differs, and change nothing

A generated table sits between `<!-- table: NAME -->` and `<!-- end -->`; NAME is a key of
TABLES, whose function renders it (the facts of the run, then the table) from the JSON its
benchmark wrote (`--json`; quality.py's saved sweeps). Everything outside the markers is
written by hand. Only json, statistics and family_stats (the same) are imported, so the check
runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import family_stats

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- table: ([a-z0-9-]+) -->\n)(.*?)(<!-- end -->)", re.S)
MIB = 2**20


def _load(results: Path, name: str) -> dict:
    return json.loads((results / name).read_text())


def _load_range(before: list[float], after: list[float]) -> str:
    """The 1-minute load average at the start and at the end of a run."""
    return f"load average {before[0]:.2f} -> {after[0]:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# -- merge.py and analyze_memory.py ---------------------------------------------------------------

MERGE_RUNS = {
    "lossless": "merge lossless",
    "threshold": "merge threshold (cosine 0.999)",
    "budget": "merge budget (0.375)",
    "analyze": "analyze --metric cosine",
}
"""merge.py's modes, named by the command line each runs (merge.py's `modes`)."""


def merge_io(results: Path) -> list[str]:
    """merge.py --repeats N --json: each mode's median time against the I/O floor and
    mergekit of the same runs, peak RSS against one MoE layer of all models, bytes."""
    d = _load(results, "merge-io.json")
    runs, inputs = d["runs"], d["inputs"]

    def times(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} s ({', '.join(f'{v:.1f}' for v in values)})"

    rows = []
    if all(r["floor"] for r in runs):
        floors = [r["floor"]["floor_seconds"] for r in runs]
        rows.append(["I/O floor (`cat` inputs, `cp -r` artifact, `sync`)", times(floors), "1.00x", "", "", "", ""])
    if all(r["mergekit"] for r in runs):
        kits = [r["mergekit"]["seconds"] for r in runs]
        rss = runs[0]["mergekit"]["peak_rss_mib"]
        rows.append(["mergekit linear merge", times(kits), "", "1.00x", f"{rss} MiB", "", ""])
    for s in d["summary"]:
        rss, layer = s["median_peak_rss_mib"], s["one_layer_all_models_mib"]
        bank = f"{s['bank_experts']} / {s['experts_in']}" if "bank_experts" in s else ""
        size = (
            f"{s['artifact_bytes'] / 1e9:.2f} / {s['input_bytes'] / 1e9:.2f} GB ({s['artifact_bytes'] / s['input_bytes']:.1%})"
            if "artifact_bytes" in s
            else ""
        )
        rows.append(
            [
                MERGE_RUNS.get(s["mode"], s["mode"]),
                times(s["seconds"]),
                f"**{s['median_over_floor']:.2f}x**" if "median_over_floor" in s else "",
                f"**{s['median_over_mergekit']:.2f}x**" if "median_over_mergekit" in s else "",
                f"{rss} MiB ({rss / layer:.2f}x)",
                bank,
                size,
            ]
        )
    facts = (
        f"{d['cpus']} CPUs; {len(runs)} runs, medians (a ratio is the median of each run's own); "
        f"{_load_range(runs[0]['load_average_before'], runs[-1]['load_average_after'])}; "
        f"inputs {inputs['models']} x {inputs['layers']} layers x {inputs['experts']} experts "
        f"({inputs['shared']} shared), {inputs['bytes'] / 1e9:.2f} GB."
    )
    header = [
        "run",
        "median time (runs)",
        "/ I/O floor",
        "/ mergekit",
        "peak RSS (/ one layer)",
        "bank experts",
        "artifact / inputs",
    ]
    return [facts, "", *_table(header, rows)]


def analyze_memory(results: Path) -> list[str]:
    """analyze_memory.py --json: peak RSS against one MoE layer of all models, time against a
    plain read of the same expert bytes and mergekit's linear merge."""
    d = _load(results, "analyze-memory.json")
    layer, imports = d["one_layer_all_models_mib"], d["imports_rss_mib"]
    plain = d["plain_read"]
    rows = [
        ["plain `preadv` of every expert", "", f"{plain['seconds']:.2f} s", f"{plain['cpu_seconds']:.2f} s", "", ""]
    ]
    for r in d["rows"]:
        rss = r["peak_rss_mib"]
        rows.append(
            [
                f"`analyze --metric {','.join(r['metrics'])}`",
                f"{rss} MiB ({rss / layer:.2f}x; {rss - imports} MiB above the imports)",
                f"{r['seconds']:.1f} s",
                f"{r['cpu_seconds']:.1f} s",
                f"**{r['over_mergekit']:.2f}x**",
                f"{r['load_average']:.1f}",
            ]
        )
    kit = d["mergekit"]
    rows.append(
        [
            "mergekit linear merge",
            f"{kit['peak_rss_mib']} MiB",
            f"{kit['seconds']:.1f} s",
            "",
            "1.00x",
            f"{kit['load_average']:.1f}",
        ]
    )
    inputs = d["inputs"]
    facts = (
        f"{d['cpus']} CPUs; inputs {inputs['models']} x {inputs['layers']} layers x {inputs['experts']} experts, "
        f"{inputs['bytes'] / 2**30:.2f} GiB; one MoE layer of all models {layer} MiB; the imports {imports} MiB."
    )
    header = ["run", "peak RSS (/ one layer)", "wall", "CPU", "/ mergekit", "load average"]
    return [facts, "", *_table(header, rows)]


def quantized_analyze(results: Path) -> list[str]:
    """quantized_analyze.py --json: peak RSS against one layer of all models as float32 values,
    CPU time against transformers' dequantization of every distinct expert."""
    d = _load(results, "quantized-analyze.json")
    layer, imports, peak = d["layer_f32_bytes"], d["imports_rss"], d["analyze_peak_rss"]
    bound = d["transformers_dequantize_seconds"]
    facts = (
        f"{d['cpus']} CPUs, load average {d['load_average']:.1f}; inputs {d['models']} x {d['layers']} layers x "
        f"{d['experts']} MXFP4 experts of gpt-oss-20b's shapes, {d['inputs_bytes'] / 2**30:.2f} GiB; one layer of all "
        f"models as float32 values {layer / MIB:.0f} MiB; torch and analysis imported {imports / MIB:.0f} MiB."
    )
    rows = [
        ["transformers' `convert_moe_packed_tensors`, distinct experts", "", "", f"{bound:.1f} s", "1.00x"],
        [
            "`analyze --metric cosine`",
            f"{peak / MIB:.0f} MiB ({peak / layer:.2f}x; {(peak - imports) / MIB:.0f} MiB above the imports)",
            f"{d['analyze_seconds']:.1f} s",
            f"{d['analyze_cpu_seconds']:.1f} s",
            f"**{d['analyze_cpu_seconds'] / bound:.2f}x**",
        ],
    ]
    header = ["run", "peak RSS (/ one layer as values)", "wall", "CPU", "CPU / dequantization"]
    return [facts, "", *_table(header, rows)]


# -- non_expert_codec.py --------------------------------------------------------------------------


def codec_methods(results: Path) -> list[str]:
    """non_expert_codec.py --json: each way of storing a fine-tune's changed non-expert
    tensors against its base, bytes and speed, beside a memcpy of the same bytes."""
    d = _load(results, "non-expert-codec.json")
    c = d["codecs"]
    rows = [[m["method"], f"{m['ratio']:.1%}", f"{m['encode_mb_s']:.0f}", f"{m['decode_mb_s']:.0f}"] for m in c["rows"]]
    rows.append(["memcpy of the same bytes (`copy_`)", "100%", f"{c['memcpy_mb_s']:.0f}", f"{c['memcpy_mb_s']:.0f}"])
    facts = (
        f"The pair: {d['pair']}. {c['changed_tensors']} of its {c['changed_tensors'] + c['unchanged_tensors']} "
        f"non-expert tensors changed ({c['changed_bytes'] / 1e6:.1f} MB); {_load_range(d['load_average'], d['load_average_after'])}."
    )
    return [facts, "", *_table(["method", "stored / whole", "encode MB/s", "decode MB/s"], rows)]


def codec_merges(results: Path) -> list[str]:
    """non_expert_codec.py --json: lossless merges with `--non-expert-codec none` and
    `xor-zstd`: non-expert bytes, artifact bytes, merge and runtime load time."""
    d = _load(results, "non-expert-codec.json")
    rows = []
    for m in d["merges"]:
        none, xor = m["none"], m["xor-zstd"]
        rows.append(
            [
                m["inputs"],
                f"{xor['non_expert'] / 1e6:.2f} / {xor['non_expert_whole'] / 1e6:.2f} MB "
                f"({xor['non_expert'] / xor['non_expert_whole']:.1%}; {xor['encoded']} encoded)",
                f"{none['artifact'] / 1e6:.2f} -> {xor['artifact'] / 1e6:.2f} MB",
                f"{none['merge_s']:.2f} -> {xor['merge_s']:.2f} s",
                f"{none['load_s']:.2f} -> {xor['load_s']:.2f} s",
            ]
        )
    header = ["inputs", "non-expert stored / whole", "artifact", "merge", "runtime load"]
    return ["`none` -> `xor-zstd`, each the best of two, interleaved.", "", *_table(header, rows)]


# -- turnaround.py --------------------------------------------------------------------------------

SYSTEMS = (
    "moeconsol",
    "moeconsol, one step for all variants",
    "whole-model switching",
    "static partition",
    "all resident",
)
"""turnaround.py's systems, in its order; the first two are moeconsol's."""


def _turnaround(name: str) -> Callable[[Path], list[str]]:
    def render(results: Path) -> list[str]:
        """turnaround.py --json: per system, what it keeps resident, its mean time to first
        token over the traces, and its mean turnaround in each trace (moeconsol's also over
        the static partition's and all resident's of the same trace)."""
        d = _load(results, f"{name}.json")
        systems = [s for s in SYSTEMS if any(r["system"] == s for r in d["rows"])]
        cells = {(r["popularity"], r["rate"], r["system"]): r for r in d["rows"]}
        traces = list(dict.fromkeys((r["popularity"], r["rate"]) for r in d["rows"]))
        rows = []
        for s in systems:
            mine = [r for r in d["rows"] if r["system"] == s]
            ttft = [r["mean_ttft"] for r in mine]
            row = [s, f"{mine[0]['resident_bytes'] / MIB:.1f} MiB", f"{min(ttft):.2f}-{max(ttft):.2f} s"]
            for popularity, rate in traces:
                mean = cells[(popularity, rate, s)]["mean_turnaround"]
                cell = f"{mean:.2f} s"
                if s in SYSTEMS[:2]:
                    bounds = [cells.get((popularity, rate, b)) for b in ("static partition", "all resident")]
                    cell += " (" + ", ".join(f"{mean / b['mean_turnaround']:.2f}x" for b in bounds if b) + ")"
                row.append(cell)
            rows.append(row)
        shape = d.get("shape") or d["size"]
        repeats = d.get("repeats", 1)
        facts = (
            f"{d['variants']} variants (hidden {shape['hidden_size']}, experts {shape['hidden_size']} x "
            f"{shape['intermediate_size']}, {shape['num_hidden_layers']} layers x {shape['num_local_experts']}, "
            f"{d.get('dtype', 'float32')}), {d['requests']} requests of {d['new_tokens']} tokens per trace, "
            f"partition `{d.get('partition', 'pinned')}`, "
            + (f"{repeats} replays per system (medians)" if repeats > 1 else "one replay per system")
            + f", device `{d['device']}`; {_load_range(d.get('load_average_start') or d['load_average'], d['load_average'])}. "
            "Mean turnaround per trace; moeconsol's also / static partition, / all resident."
        )
        header = ["system", "resident", "mean TTFT", *(f"{p} {r:g}/s" for p, r in traces)]
        return [facts, "", *_table(header, rows)]

    return render


# -- quality.py -----------------------------------------------------------------------------------

QUALITY_RUNS = ("family1-mixtral", "family1-switch", "family2-mixtral", "family2-switch")
"""quality.py's saved sweeps (quality-NAME.json), one per family and architecture."""
QUALITY_METHODS = ("calibrated", "deltas", "budget", "reference", "average")
"""The methods shown, moeconsol's own first; uniform averaging is the bound at matched memory."""
OTHER_BASELINES = ("task-arithmetic", "ties")


def quality(results: Path) -> list[str]:
    """quality.py: per family, architecture, method and budget, the mean retained gain over
    the fine-tuned variants and the variant that keeps the least (the full tables: the
    quality-*.md beside the JSON)."""
    runs = {name: _load(results, f"quality-{name}.json") for name in QUALITY_RUNS}
    budgets = sorted({p["budget"] for d in runs.values() for p in d["points"] if p["budget"] is not None}, reverse=True)
    rows, others = [], []
    for name, d in runs.items():
        fine_tuned = [n for n in d["original"] if n != "base"]
        points = [p for p in d["points"] if p.get("error") is None]

        def cell(p: dict) -> str:
            gains = {n: p["retained_gain"][n] for n in fine_tuned}
            worst = min(fine_tuned, key=gains.__getitem__)
            return f"{sum(gains.values()) / len(gains):.0%} ({worst} {gains[worst]:.0%})"

        metric = "perplexity" if d["metric"] == "perplexity" else "token accuracy"
        label = f"{name.replace('-', ' / ')}: {', '.join(fine_tuned)} ({metric})"
        for method in QUALITY_METHODS:
            at = {p["budget"]: p for p in points if p["method"] == method}
            if None in at:  # a merging baseline: one model's worth of experts, shown at the floor
                rows.append(
                    [label, f"{method} ({at[None]['expert_fraction']:.0%})", *[""] * (len(budgets) - 1), cell(at[None])]
                )
            elif at:
                rows.append([label, method, *(cell(at[b]) if b in at else "" for b in budgets)])
            label = ""
        others.append(
            f"{name.replace('-', ' / ')}: "
            + ", ".join(f"{p['method']} {cell(p)}" for m in OTHER_BASELINES for p in points if p["method"] == m)
        )
    header = ["family / architecture: fine-tuned variants", "method \\ budget", *(f"{b:g}" for b in budgets)]
    return [*_table(header, rows), "", "Task arithmetic and TIES (25%): " + "; ".join(others) + "."]


FAMILY_ARCHS = ("mixtral", "switch")
"""quality.py --families saves one file per architecture: quality-families-report-ARCH.json."""


def quality_families(results: Path) -> list[str]:
    """quality.py --families K: over every fine-tuned variant of the report families, per
    budget and method the worst variant, p10, median and mean of the retained gain and the
    variants more than 10 points below the reference; the goals first."""
    runs = [_load(results, f"quality-families-report-{arch}.json") for arch in FAMILY_ARCHS]
    families = [f for r in runs for f in r["families"]]
    table, goals = family_stats.summarize(families)
    settings = runs[0]["settings"]
    counts = ", ".join(f"{len(r['families'])} {r['arch']}" for r in runs)
    facts = (
        f"Report families: seeds {', '.join(map(str, sorted({s for r in runs for s in r['seeds']})))} "
        "of each architecture "
        f"({counts}; size {settings['size']}), "
        f"{sum(len(f['sweep']['original']) - 1 for f in families)} fine-tuned variants; "
        f"{runs[0]['cpus']} CPUs. Goals, worst variant first:"
    )
    return [facts, "", *family_stats.goal_lines(goals), "", *family_stats.stats_table(table)]


# -- scale.py ---------------------------------------------------------------------------------------

SCALE_FAMILIES = ("olmoe", "qwen3", "mixtral", "gpt-oss", "deepseek-v2-lite")
"""scale.py's families, in the page's order (a family without results is left out)."""


def _scale_results(results: Path) -> list[dict]:
    return [_load(results, f"scale-{f}.json") for f in SCALE_FAMILIES if (results / f"scale-{f}.json").exists()]


def _seconds(x: float | None) -> str:
    return "" if x is None else f"{x:.2f} s" if x < 100 else f"{x:.0f} s"


def scale_steps(results: Path) -> list[str]:
    """scale.py --json: every step's time against its bound of the same run, peak RSS."""
    out: list[str] = []
    for d in _scale_results(results):
        x = d["extrapolated"]
        out.append(
            f"**{d['label']}**, {d.get('layers_written', x['layers'])} of {x['layers']} layers: inputs 3 x "
            f"{d['input_bytes'] / 3 / 1e9:.2f} GB ({d['input_bytes_on_disk'] / 1e9:.2f} GB on disk), "
            f"{_load_range(d['load_average'][:1], d['load_average'][-1:])}."
        )
        out.append("")
        rows = [
            [
                r["step"],
                _seconds(r["seconds"]),
                f"{_seconds(r['bound_seconds'])} ({r['bound']})" if r["bound_seconds"] is not None else "",
                "" if r["ratio"] is None else f"**{r['ratio']:.2f}x**",
                "" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']} MiB",
                r["note"],
            ]
            for r in d["rows"]
        ]
        out += _table(["step", "time", "bound (same run)", "/ bound", "peak RSS", ""], rows)
        out.append("")
    return out[:-1]


def scale_extrapolated(results: Path) -> list[str]:
    """scale.py --json: each step's time scaled by bytes to the whole released model."""
    rows = []
    for d in _scale_results(results):
        x = d["extrapolated"]
        for s in x["steps"]:
            rows.append(
                [
                    f"{d['label']} ({x['whole_bytes'] / 1e9:.1f} GB, {x['layers']} layers)",
                    s["step"],
                    _seconds(s["per_layer_seconds"]),
                    _seconds(s["whole_seconds"]),
                    _seconds(s["whole_bound_seconds"]),
                ]
            )
    return _table(["released model", "step", "per decoder layer", "whole model", "its bound"], rows)


TABLES: dict[str, Callable[[Path], list[str]]] = {
    "analyze-memory": analyze_memory,
    "merge-io": merge_io,
    "non-expert-codec": codec_methods,
    "non-expert-merges": codec_merges,
    "quality": quality,
    "quality-families": quality_families,
    "quantized-analyze": quantized_analyze,
    "scale": scale_steps,
    "scale-extrapolated": scale_extrapolated,
    "turnaround-quota": _turnaround("turnaround-quota"),
    "turnaround-wide": _turnaround("turnaround-wide"),
    "turnaround-wide2": _turnaround("turnaround-wide2"),
}


def render_page(text: str, results: Path) -> tuple[str, list[str]]:
    """The page with every generated table rendered again, and the names of those that
    changed. Raises ValueError for a marker of an unknown table, or a table of TABLES that
    the page lacks or holds twice."""
    found = [m.group(2) for m in BLOCK.finditer(text)]
    unknown = sorted(set(found) - set(TABLES))
    if unknown:
        raise ValueError(f"unknown table(s) {', '.join(unknown)}; known: {', '.join(TABLES)}")
    wrong = [name for name in TABLES if found.count(name) != 1]
    if wrong:
        raise ValueError(f"each table must appear once between its markers: {', '.join(wrong)}")
    changed = []

    def replace(m: re.Match) -> str:
        try:
            body = "\n".join(TABLES[m.group(2)](results)) + "\n"
        except (KeyError, TypeError, IndexError) as e:
            raise ValueError(f"table {m.group(2)}: its JSON lacks {e}; rerun its benchmark with --json") from e
        if body != m.group(3):
            changed.append(m.group(2))
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(replace, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    parser.add_argument("--page", type=Path, default=PAGE)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text = args.page.read_text()
    try:
        new, changed = render_page(text, args.results)
    except (ValueError, OSError) as e:
        print(f"tables.py: error: {args.page}: {e}", file=sys.stderr)
        return 2
    if args.check:
        for name in changed:
            print(
                f"{args.page}: table {name} differs from {args.results}; run python benchmarks/tables.py",
                file=sys.stderr,
            )
        return 1 if changed else 0
    if changed:
        args.page.write_text(new)
    print(
        f"{args.page}: {len(changed)} of {len(TABLES)} tables rewritten"
        + (f" ({', '.join(changed)})" if changed else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
