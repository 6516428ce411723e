"""Routed recall of a finished continual benchmark with task keys refit at another centre count.

Routing is fitted after training, from frozen features, so a run's prompts can be routed with K
centres per task without retraining: `python -m lpi.evaluate RUN --key-centres K` writes
RUN/eval-centres-K.json beside the run's own eval.json. This script gathers both for every run
folder of a benchmark (`benchmarks/continual.py --out DIR`) that has the K report, and writes
per config the routing accuracy and mean routed R@1 with the saved keys and with K centres
(mean ± std over seeds) and their difference paired by seed, with its 95 % t-test.

    for run in DIR/runs/*/seed-*; do python -m lpi.evaluate $run --key-centres 20; done
    python benchmarks/continual_centres.py DIR --centres 20 --out benchmarks/results/centres.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchkit import table, write_json
from continual_report import cell, paired, stats

from lpi.continual.flags import DefaultsHelp

MODALITIES = ("image", "text")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=DefaultsHelp
    )
    parser.add_argument("folder", type=Path, help="the benchmark's --out folder (holds runs/)")
    parser.add_argument("--centres", type=int, required=True, help="K of eval-centres-K.json")
    parser.add_argument("--out", type=Path, help="JSON result; None prints only")
    return parser.parse_args(argv)


def run_figures(report: dict) -> dict:
    """Routing accuracy per modality and mean routed and oracle R@1 over the final tasks."""
    r1 = report["final"]["r1"]
    return {
        "routing": report["routing_accuracy_final"],
        "routed_r1": statistics.fmean(r1["routed"].values()),
        "oracle_r1": statistics.fmean(r1["oracle"].values()),
    }


def collect(folder: Path, centres: int) -> dict[str, dict[int, dict]]:
    """config -> seed -> {"saved": figures, "refit": figures}, for runs with both reports."""
    found: dict[str, dict[int, dict]] = {}
    for refit in sorted(folder.glob(f"runs/*/seed-*/eval-centres-{centres}.json")):
        saved = refit.parent / "eval.json"
        if not saved.exists():
            continue
        seed = int(refit.parent.name.removeprefix("seed-"))
        found.setdefault(refit.parent.parent.name, {})[seed] = {
            "saved": run_figures(json.loads(saved.read_text())),
            "refit": run_figures(json.loads(refit.read_text())),
        }
    return found


def summarise(found: dict[str, dict[int, dict]]) -> list[dict]:
    rows = []
    for config, seeds in found.items():
        runs = [seeds[s] for s in sorted(seeds)]
        row: dict = {"config": config, "seeds": sorted(seeds)}
        for keys in ("saved", "refit"):
            row[keys] = {
                "routed_r1": stats([r[keys]["routed_r1"] for r in runs]),
                "oracle_r1": stats([r[keys]["oracle_r1"] for r in runs]),
                **{m: stats([r[keys]["routing"][m] for r in runs]) for m in MODALITIES},
            }
        # refit minus saved, seed by seed, through the report's own paired t-test
        paired_rows = [
            {"config": keys, "seed": seed, "routed_r1": seeds[seed][keys]["routed_r1"]}
            for seed in sorted(seeds)
            for keys in ("saved", "refit")
        ]
        row["routed_r1_gain"] = paired({"runs": paired_rows}, "refit", "saved", "routed_r1")
        rows.append(row)
    return rows


def _routing(figures: dict) -> str:
    return " / ".join(cell(figures[m], 2, True) for m in MODALITIES)


def _gain(gain: dict) -> str:
    sem = "n/a" if gain["sem"] is None else f"{gain['sem']:.2f}"
    return f"{gain['mean']:+.2f} (SE {sem}" + (", passes)" if gain["passes_t95"] else ")")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = summarise(collect(args.folder, args.centres))
    if not rows:
        raise SystemExit(f"{args.folder}: no run has eval-centres-{args.centres}.json")
    k = args.centres
    printed = [
        {
            "config": row["config"],
            "seeds": len(row["seeds"]),
            "routing saved": _routing(row["saved"]),
            f"routing {k}": _routing(row["refit"]),
            "routed saved": cell(row["saved"]["routed_r1"], 2, True),
            f"routed {k}": cell(row["refit"]["routed_r1"], 2, True),
            "gain": _gain(row["routed_r1_gain"]),
        }
        for row in rows
    ]
    print(table([(name, "{}") for name in printed[0]], printed))
    if args.out:
        write_json(args.out, {"centres": k, "configs": rows})


if __name__ == "__main__":
    main()
