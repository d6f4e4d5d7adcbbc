"""Results: the records a run wrote, turned into JSON, a markdown table, targets and the plot.

    python -m benchmarks.report DIR [--tag cuda]

reads DIR/<tag>-meta.json and DIR/<tag>-records.jsonl (written as the benchmarks run, so a run cut
short still reports what it measured), writes DIR/<tag>.json, DIR/<tag>.md and
DIR/scaling-<tag>.png, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional

from .cases import base_impl
from .targets import load_parity, targets

IMPL_ORDER = ["gemm_floor", "gemm_logits", "naive", "liger", "torch", "triton", "triton_256mb",
              "triton_lowmem", "triton_filter", "token_logprobs"]


def impl_rank(impl: str) -> tuple[int, str]:
    """Sort key: IMPL_ORDER, an implementation with switches ("triton+half") after its base."""
    base = base_impl(impl)
    return (IMPL_ORDER.index(base) if base in IMPL_ORDER else len(IMPL_ORDER), impl)


LABELS = {
    "gemm_floor": "bare LM-head GEMMs (floor)",
    "gemm_logits": "one bare GEMM (h·Wᵀ, no grad)",
    "naive": "naive (materialized logits)",
    "liger": "Liger FusedLinearGRPOLoss",
    "torch": "luffy_fast torch backend",
    "triton": "luffy_fast triton backend",
    "triton_256mb": "luffy_fast triton backend, 256 MiB budget",
    "triton_lowmem": "luffy_fast triton backend, 128 MiB budget (recompute)",
    "triton_filter": "luffy_fast triton backend, gradient filter",
    "token_logprobs": "luffy_fast token_logprobs (triton, no grad)",
}


class Recorder:
    """Appends records to DIR/<tag>-records.jsonl as they are measured."""

    def __init__(self, out_dir: Path, tag: str, meta: dict, append: bool = False):
        self.out_dir, self.tag = Path(out_dir), tag
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / f"{tag}-records.jsonl"
        if not append:
            self.path.write_text("")
            (self.out_dir / f"{tag}-meta.json").write_text(json.dumps(meta, indent=1) + "\n")

    def add(self, **record) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def load(out_dir: Path, tag: str) -> tuple[dict, list[dict]]:
    meta_path = out_dir / f"{tag}-meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"tag": tag}
    path = out_dir / f"{tag}-records.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []
    return meta, records


# ---- formatting --------------------------------------------------------------------------------

def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "–"
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def fmt_ratio(x: Optional[float], digits: int = 2) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    # small values (errors such as 1.1e-05) in scientific notation, not as 0.00
    return f"{x:.1e}" if x != 0 and abs(x) < 10 ** -digits else f"{x:.{digits}f}"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b not in (None, 0) else None


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# ---- summary -----------------------------------------------------------------------------------

def summarize(meta: dict, records: list[dict], parity: Optional[dict] = None) -> dict:
    """Per case: each implementation's time and memory, with ratios; then targets and the sweep."""
    cases: dict[str, dict] = {}
    sweep: dict[str, dict] = {}
    for r in records:
        if r.get("sweep"):
            sweep.setdefault(r["case_id"], {"case": r["case"], "impls": {}})["impls"][r["impl"]] = r
            continue
        entry = cases.setdefault(r["case_id"], {"case": r["case"], "impls": {}})
        kinds = entry["impls"].setdefault(r["impl"], {})
        if r["kind"] == "time":  # one record per interleaved round
            kinds.setdefault("time_rounds", []).append(r)
        else:
            kinds[r["kind"]] = r

    for entry in cases.values():
        impls = entry["impls"]
        for kinds in impls.values():
            if "time_rounds" in kinds:
                kinds["time"] = combine_rounds(kinds.pop("time_rounds"))

        def ok(impl: str, kind: str, key: str, impls: dict = impls):
            rec = impls.get(impl, {}).get(kind)
            return rec.get(key) if rec and rec.get("status") == "ok" else None

        def time_ratio(a: str, b: str, impls: dict = impls) -> Optional[float]:
            """Median over rounds of time(a) / time(b) in the same round (adjacent in time)."""
            ta, tb = (impls.get(i, {}).get("time") or {} for i in (a, b))
            if ta.get("status") != "ok" or tb.get("status") != "ok":
                return None
            ra, rb = ta.get("by_round", {}), tb.get("by_round", {})
            paired = [ra[k] / rb[k] for k in ra if k in rb and rb[k] > 0]
            return _median(paired) if paired else _ratio(ta["median_s"], tb["median_s"])

        naive_m = ok("naive", "memory", "extra_bytes")
        for impl, kinds in impls.items():
            kinds["ratios"] = {"time_vs_naive": time_ratio(impl, "naive"),
                               "liger_speedup": time_ratio("liger", impl),
                               "time_vs_floor": time_ratio(impl, "gemm_floor"),
                               "time_vs_one_gemm": time_ratio(impl, "gemm_logits"),
                               "memory_vs_naive": _ratio(ok(impl, "memory", "extra_bytes"), naive_m)}
    summary = {"meta": meta, "cases": cases, "sweep": sweep}
    summary["targets"] = targets(summary, parity)
    return summary


def _median(values: list[float]) -> float:
    values, n = sorted(values), len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def combine_rounds(rounds: list[dict]) -> dict:
    """The median over an implementation's timed rounds; else why it was not timed."""
    timed = [r for r in rounds if r["status"] == "ok"]
    if not timed:
        return rounds[-1]
    seconds = sorted(r["seconds"] for r in timed)
    return {"status": "ok", "median_s": _median(seconds), "min_s": seconds[0], "max_s": seconds[-1],
            "rounds": len(seconds), "by_round": {str(r.get("round")): r["seconds"] for r in timed}}


def markdown(summary: dict, plot_name: Optional[str] = None) -> str:
    meta = summary["meta"]
    lines = [f"### {meta.get('tag', '?')}: {meta.get('date', '?')}", ""]
    machine = meta.get("machine", "?")
    lines += [f"Machine: {machine}. Software: {meta.get('software', '?')}.",
              f"Command: `{meta.get('command', '?')}`. Time: forward + backward"
              f"{' (synchronized)' if meta.get('tag') == 'cuda' else ''}, {meta.get('rounds', '?')} "
              f"rounds interleaving the implementations, {meta.get('warmup_rounds', '?')} warm-up; "
              "the median over rounds, and each time ratio is the median over rounds of the ratio "
              "within the same round (robust to load changes between rounds). Extra memory: peak "
              "beyond inputs and gradients, each implementation in its own process.", ""]
    show_floor = any("gemm_floor" in e["impls"] for e in summary["cases"].values())
    for entry in summary["cases"].values():
        case = entry["case"]
        lines += [f"**{case['scenario']}** · T={case['T']} H={case['H']} V={case['V']} {case['dtype']}", ""]
        header = ["implementation", "median fwd+bwd", "rounds", "× naive time", "Liger time ÷ this"]
        header += ["× GEMM floor"] if show_floor else []
        header += ["extra peak memory", "× naive memory"]
        rows = []
        for impl in sorted(entry["impls"], key=impl_rank):
            kinds = entry["impls"][impl]
            t, m, ratios = kinds.get("time"), kinds.get("memory"), kinds.get("ratios", {})
            t_text = fmt_time(t.get("median_s")) if t and t["status"] == "ok" else \
                (f"{t['status']}" if t else "–")
            m_text = fmt_bytes(m.get("extra_bytes")) if m and m["status"] == "ok" else \
                (f"{m['status']}" if m else "–")
            by_round = (t or {}).get("by_round", {})
            rounds_text = " / ".join(f"{by_round[k]:.3g}" for k in sorted(by_round, key=int)) or "–"
            row = [LABELS.get(impl, impl), t_text, rounds_text, fmt_ratio(ratios.get("time_vs_naive")),
                   fmt_ratio(ratios.get("liger_speedup"))]
            row += [fmt_ratio(ratios.get("time_vs_floor"))] if show_floor else []
            row += [m_text, fmt_ratio(ratios.get("memory_vs_naive"), 3)]
            rows.append(row)
        lines += _table(header, rows, "lrrrr" + ("r" if show_floor else "") + "rr") + [""]
        skipped = [f"{impl}: {k['time'].get('note')}" for impl, k in entry["impls"].items()
                   if k.get("time", {}).get("status") not in (None, "ok") and k["time"].get("note")]
        lines += [f"- not measured: {s}" for s in skipped] + ([""] if skipped else [])

    if summary["targets"]:
        rows = [[t["target"], t["where"], fmt_ratio(t["measured"]),
                 {True: "met", False: "MISSED", None: "not measured"}[t["met"]]]
                for t in summary["targets"]]
        lines += ["**Targets** (docs/design.md)", ""]
        lines += _table(["target", "case", "measured", ""], rows, "llrl") + [""]

    if summary["sweep"]:
        entries = sorted(summary["sweep"].values(), key=lambda e: e["case"]["T"])
        c0 = entries[0]["case"]
        impls = sorted({i for e in entries for i in e["impls"]}, key=impl_rank)
        lines += [f"**Peak extra memory vs T** ({c0['scenario']}, H={c0['H']} V={c0['V']} "
                  f"{c0['dtype']})", ""]
        rows, notes = [], {}
        for e in entries:
            row = [str(e["case"]["T"])]
            for impl in impls:
                r = e["impls"].get(impl)
                if r is None:
                    row.append("–")
                elif r["status"] == "ok":
                    row.append(fmt_bytes(r["extra_bytes"]))
                else:
                    note = f"{impl}: {r.get('note') or r['status']}"
                    mark = notes.setdefault(note, len(notes) + 1)
                    row.append(f"{r['status']} [{mark}]")
            rows.append(row)
        lines += _table(["T"] + [LABELS.get(i, i) for i in impls], rows, "r" * (len(impls) + 1))
        lines += [""] + [f"[{mark}] {note}" for note, mark in notes.items()] if notes else []
        if plot_name:
            lines += ["", f"![peak extra memory vs T]({plot_name})"]
        lines += [""]
    return "\n".join(lines)


def short_table(summary: dict) -> str:
    """One compact table of every measurement, then the targets: for a terminal."""
    rows = []
    for entry in summary["cases"].values():
        c = entry["case"]
        for impl in sorted(entry["impls"], key=impl_rank):
            kinds = entry["impls"][impl]
            t, m, r = kinds.get("time") or {}, kinds.get("memory") or {}, kinds.get("ratios", {})
            rows.append([f"{c['scenario']} T={c['T']} H={c['H']}", impl,
                         fmt_time(t.get("median_s")) if t.get("status") == "ok" else t.get("status", "–"),
                         fmt_ratio(r.get("time_vs_naive")), fmt_ratio(r.get("time_vs_floor")),
                         fmt_ratio(r.get("liger_speedup")),
                         fmt_bytes(m.get("extra_bytes")) if m.get("status") == "ok" else m.get("status", "–"),
                         fmt_ratio(r.get("memory_vs_naive"), 3)])
    header = ["case", "impl", "time", "×naive", "×floor", "Liger÷", "extra mem", "mem×naive"]
    lines = _table(header, rows, "llrrrrrr")
    if summary["targets"]:
        lines += [""] + _table(["target", "case", "measured", ""], [
            [t["target"], t["where"], fmt_ratio(t["measured"]),
             {True: "met", False: "MISSED", None: "not measured"}[t["met"]]]
            for t in summary["targets"]], "llrl")
    return "\n".join(lines)


def plot_sweep(summary: dict, path: Path) -> bool:
    """Log-log plot of each implementation's peak extra memory against T. False if no data."""
    series: dict[str, list[tuple[int, float]]] = {}
    for e in summary["sweep"].values():
        for impl, r in e["impls"].items():
            if r["status"] == "ok" and r["extra_bytes"] > 0:
                series.setdefault(impl, []).append((e["case"]["T"], r["extra_bytes"] / 2**20))
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c0 = next(iter(summary["sweep"].values()))["case"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for impl in sorted(series, key=impl_rank):
        points = sorted(series[impl])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=LABELS.get(impl, impl))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens T")
    ax.set_ylabel("peak extra memory (MiB)")
    ax.set_title(f"{summary['meta'].get('tag')}: H={c0['H']} V={c0['V']} {c0['dtype']}, fwd+bwd")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(out_dir: Path, tag: str) -> dict:
    """Writes <tag>.json, <tag>.md and the plot from the run's records; returns the summary."""
    meta, records = load(out_dir, tag)
    summary = summarize(meta, records, load_parity(out_dir))
    plot = out_dir / f"scaling-{tag}.png"
    has_plot = plot_sweep(summary, plot)
    summary["markdown"] = markdown(summary, plot.name if has_plot else None)
    (out_dir / f"{tag}.json").write_text(json.dumps({**summary, "records": records}, indent=1) + "\n")
    (out_dir / f"{tag}.md").write_text(summary["markdown"])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description="Summarize a benchmark run's records.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tag", default=None, help="cpu, cuda or dry-run (default: the newest)")
    parser.add_argument("--short", action="store_true", help="print the compact table only")
    args = parser.parse_args()
    tag = args.tag
    if tag is None:
        metas = sorted(args.out_dir.glob("*-records.jsonl"), key=lambda p: p.stat().st_mtime)
        if not metas:
            raise SystemExit(f"no *-records.jsonl in {args.out_dir}")
        tag = metas[-1].name[: -len("-records.jsonl")]
    summary = write(args.out_dir, tag)
    print(short_table(summary) if args.short else summary["markdown"])


if __name__ == "__main__":
    main()
