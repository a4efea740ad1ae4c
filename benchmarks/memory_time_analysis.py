"""Did the benchmark meet its targets? Fits, ratios and PASS/MISS from the result rows; the CSV files; the report.

``analyse`` gives the summary (least-squares lines, learned+/mehl+ and hl+/mehl+ ratios, the three targets),
``print_report`` prints it, ``write_csv`` / ``read_rows`` write and read the benchmark and step CSVs.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from _bench_common import CSV_COLUMNS, METHODS

TARGET_K = 72
TARGET_MEMORY_RATIO = 13.0
TARGET_FLAT = 0.10
TARGET_STEP_RATIO = 1.2


# ---- analysis ----------------------------------------------------------------------------------------------------
def linear_fit(points: Sequence[tuple[float, float]]) -> dict[str, float] | None:
    """Least squares ``y = a + s x``; None with fewer than 2 distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return {"intercept": my - slope * mx, "slope": slope}


def _value_at(fit: dict[str, float], k: float) -> float:
    return fit["intercept"] + fit["slope"] * k


def analyse(rows: list[dict[str, Any]], steps: dict[str, Any] | None) -> dict[str, Any]:
    """Ratios, fits and the three targets from the merged rows and the step timing."""
    ok = [r for r in rows if r.get("status") == "ok"]
    peak = {(r["method"], r["K"]): r["peak_memory_bytes"] for r in ok}
    per_epoch = {(r["method"], r["K"]): r["seconds_per_epoch"] for r in ok if r.get("seconds_per_epoch")}
    default_peak = {(r["method"], r["K"]): r["peak_memory_bytes_default_malloc"] for r in ok
                    if r.get("peak_memory_bytes_default_malloc")}
    by_method = {m: sorted((k, v) for (mm, k), v in peak.items() if mm == m) for m in METHODS}
    fits = {m: linear_fit(pts) for m, pts in by_method.items()}
    model_bytes = next((r["model_bytes"] for r in ok if r.get("model_bytes")), None)

    def ratios(table: dict, num: str, den: str = "mehl+") -> dict[str, float]:
        ks = sorted({k for m, k in table if m == num} & {k for m, k in table if m == den})
        return {str(k): table[(num, k)] / table[(den, k)] for k in ks}

    out: dict[str, Any] = {
        "memory_fit_bytes": {m: f for m, f in fits.items() if f is not None},
        "memory_fit_models": ({m: {"intercept": f["intercept"] / model_bytes, "slope": f["slope"] / model_bytes}
                               for m, f in fits.items() if f is not None} if model_bytes else {}),
        "memory_ratio_learned_over_mehl": ratios(peak, "learned+"),
        "memory_ratio_hl_over_mehl": ratios(peak, "hl+"),
        "memory_ratio_learned_over_mehl_default_malloc": ratios(default_peak, "learned+"),
        "seconds_per_epoch": {m: {str(k): v for (mm, k), v in sorted(per_epoch.items()) if mm == m} for m in METHODS},
        "seconds_per_epoch_ratio_learned_over_mehl": ratios(per_epoch, "learned+"),
        "seconds_per_epoch_ratio_hl_over_mehl": ratios(per_epoch, "hl+"),
        "targets": {},
    }
    out["growth"] = {m: {"K_range": [pts[0][0], pts[-1][0]], "peak_ratio_last_over_first": pts[-1][1] / pts[0][1],
                         "bytes_per_extra_model": fits[m]["slope"] if fits[m] else None}
                     for m, pts in by_method.items() if len(pts) >= 2}

    targets = out["targets"]
    mehl = [(k, v) for k, v in by_method["mehl+"] if k >= 8]
    if len(mehl) >= 2:
        values = [v for _, v in mehl]
        spread = max(values) / min(values) - 1
        targets["mehl_flat"] = {"target": f"(max/min - 1) of MEHL+ peak over K in {[k for k, _ in mehl]} "
                                          f"<= {TARGET_FLAT:.0%}",
                                "value": spread, "change_K8_to_Kmax": values[-1] / values[0] - 1,
                                "result": "PASS" if spread <= TARGET_FLAT else "MISS"}
    else:
        targets["mehl_flat"] = {"target": "MEHL+ flat from K = 8", "result": "NOT MEASURED (need 2 K >= 8)"}

    ratio = None
    if ("learned+", TARGET_K) in peak and ("mehl+", TARGET_K) in peak:
        learned72, mehl72, how = peak[("learned+", TARGET_K)], peak[("mehl+", TARGET_K)], "measured"
        ratio = learned72 / mehl72
    elif fits["learned+"] and fits["mehl+"]:
        learned72, mehl72 = _value_at(fits["learned+"], TARGET_K), _value_at(fits["mehl+"], TARGET_K)
        ratio = learned72 / mehl72
        how = (f"EXTRAPOLATED to K = {TARGET_K} from least-squares lines through the measured K = "
               f"{[k for k, _ in by_method['learned+']]} (learned+) and {[k for k, _ in by_method['mehl+']]} (mehl+)")
    if ratio is None:
        targets["memory_ratio_K72"] = {"target": f">= {TARGET_MEMORY_RATIO}", "result": "NOT MEASURED"}
    else:
        targets["memory_ratio_K72"] = {"target": f"learned+/mehl+ peak at K = {TARGET_K} >= {TARGET_MEMORY_RATIO}",
                                       "value": ratio, "how": how, "learned_bytes": learned72, "mehl_bytes": mehl72,
                                       "result": ("PASS" if ratio >= TARGET_MEMORY_RATIO else "MISS")
                                       + (" (extrapolated)" if how != "measured" else "")}
    if steps is not None:
        targets["step_ratio"] = {"target": f"mehl+ inner step / plain step <= {TARGET_STEP_RATIO} "
                                           "(median over alternating pairs)",
                                 "value": steps["step_ratio"], "ratio_of_medians": steps["ratio_of_medians"],
                                 "mehl_step_seconds": steps["mehl_step_seconds"],
                                 "plain_step_seconds": steps["plain_step_seconds"],
                                 "result": "PASS" if steps["step_ratio"] <= TARGET_STEP_RATIO else "MISS"}
    else:
        targets["step_ratio"] = {"target": f"<= {TARGET_STEP_RATIO}", "result": "NOT MEASURED"}
    return out


def write_csv(rows: list[dict[str, Any]], path: Path, columns: Sequence[str] = CSV_COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def print_report(rows: list[dict[str, Any]], steps: dict[str, Any] | None, summary: dict[str, Any], log=print) -> None:
    ks = sorted({r["K"] for r in rows})
    log("\npeak memory above start, GiB [in models' worth] (seconds per epoch)")
    log("method    " + "".join(f"{'K=' + str(k):>25s}" for k in ks))
    for m in METHODS:
        cells = []
        for k in ks:
            r = next((r for r in rows if r["method"] == m and r["K"] == k), None)
            if r is None:
                cells.append(f"{'-':>25s}")
            elif r.get("status") != "ok":
                cells.append(f"{r['status'].split()[0]:>25s}")
            else:
                sec = f"{r['seconds_per_epoch']:6.1f}s" if r.get("seconds_per_epoch") else "     -"
                cells.append(f"{r['peak_memory_gib']:6.2f} [{r['peak_in_models']:5.2f}] ({sec})")
        log(f"{m:9s} " + "".join(cells))
    for key, what in (("memory_ratio_learned_over_mehl", "learned+/mehl+ memory"),
                      ("memory_ratio_hl_over_mehl", "hl+/mehl+ memory"),
                      ("memory_ratio_learned_over_mehl_default_malloc", "learned+/mehl+ memory, glibc default"),
                      ("seconds_per_epoch_ratio_learned_over_mehl", "learned+/mehl+ s/epoch"),
                      ("seconds_per_epoch_ratio_hl_over_mehl", "hl+/mehl+ s/epoch")):
        if summary.get(key):
            log(f"{what}: " + ", ".join(f"K={k}: {v:.2f}x" for k, v in summary[key].items()))
    for m, f in summary.get("memory_fit_models", {}).items():
        log(f"fit {m}: peak = {f['intercept']:.2f} + {f['slope']:.3f} K models' worth")
    if steps is not None:
        log(f"step (batch {steps['batch_size']}, b={steps['model_batch_size']}, {steps['pairs']} alternating pairs "
            f"after {steps['warmup_pairs']} warm-up): mehl+ median {steps['mehl_step_seconds']:.3f} s, plain median "
            f"{steps['plain_step_seconds']:.3f} s; median pair ratio {steps['step_ratio']:.3f} "
            f"(ratio of medians {steps['ratio_of_medians']:.3f})")
    log("\ntargets:")
    for name, t in summary["targets"].items():
        value = f"{t['value']:.3f}" if isinstance(t.get("value"), float) else "-"
        log(f"  {t['result']:20s} {name}: {value}  [{t['target']}]" + (f"  ({t['how']})" if "how" in t else ""))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a benchmark CSV with numbers parsed (empty cells become None)."""
    def parse(v: str) -> Any:
        if v == "":
            return None
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as fh:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]
