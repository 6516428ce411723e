"""The continual benchmark's report: table, statistics and Pareto plot from results.json.

Reads what benchmarks/continual.py wrote (finished or partial: a missing run is shown missing,
never filled in) and writes a markdown table of mean +- std over seeds, a JSON with every
mean, standard deviation and standard error, the comparisons that pass a paired t-test, and a
Pareto plot of final oracle R@1 against trainable parameters per task.

A comparison pairs the two configs seed by seed (same data, backbone and batch order per
seed): its standard error is std(a - b) / sqrt(n) over the common seeds, and it counts only
when |mean(a - b)| > t * SE, t the two-sided 95% critical value of Student's t with n - 1
degrees of freedom (4.30 for 3 seeds: "2 standard errors" would claim far too much), n >= 2.

    python benchmarks/continual_report.py runs/continual/results.json --out-dir docs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from continual_per_task import per_task_lines, routing_lines, routing_summary

from lpi import atomic

# (key, header, path in a run row); every metric is aggregated over seeds.
METRICS = [
    ("r1", "R@1", "oracle.r1"),
    ("r5", "R@5", "oracle.r5"),
    ("r10", "R@10", "oracle.r10"),
    ("rsum", "rsum", "oracle.rsum"),
    ("forgetting", "forgetting", "oracle.forgetting"),
    ("routed_r1", "routed R@1", "routed.r1"),
    ("routed_rsum", "routed rsum", "routed.rsum"),
    ("routed_forgetting", "routed forgetting", "routed.forgetting"),
    ("routing_image", "routing img %", "routing_accuracy.image"),
    ("routing_text", "routing txt %", "routing_accuracy.text"),
    ("swap_gap", "swap gap", "swap.gap"),
    ("swap_off", "swap off-diag R@1", "swap.off_diagonal_mean"),
    (
        "seconds",
        "s/run",
        "seconds.total",
    ),  # training with its per-task evaluations, final eval, swap
]
PARETO_FAMILIES = ("dense", "lpi", "lpi-Ri1", "lpi-no-interaction")
ABLATIONS = ("shared", "lpi-no-layer", "lpi-no-task")  # single points beside the curves
PNG, JSON_OUT, MARKDOWN = "continual_pareto.png", "continual_results.json", "continual_results.md"


def value(row: dict, path: str) -> float | None:
    """The number at a dotted path of a run row, None where it is absent or not measured."""
    node = row
    for part in path.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return None
        node = node[part]
    return float(node) if isinstance(node, int | float) else None


# Student's t, two-sided 95% (the 0.975 quantile), for 1..30 degrees of freedom (4 decimals,
# standard tables; tests check each against an integral of the density).
T95_ROWS = (  # df 1-10, 11-20, 21-30
    (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281),
    (2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860),
    (2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423),
)
T95 = tuple(value for row in T95_ROWS for value in row)


def t_critical(df: int) -> float:
    """The two-sided 95% critical value of Student's t with `df` >= 1 degrees of freedom."""
    if df <= len(T95):
        return T95[df - 1]
    # Cornish-Fisher expansion about the normal's 1.96: within 1e-4 of the table at df = 30.
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def stats(values: list[float]) -> dict:
    """n, mean, sample std (None below two values) and standard error std / sqrt(n)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "sem": None, "values": []}
    std = statistics.stdev(values) if n >= 2 else None
    sem = None if std is None else std / math.sqrt(n)
    return {"n": n, "mean": statistics.fmean(values), "std": std, "sem": sem, "values": values}


def aggregate(results: dict) -> dict[str, dict]:
    """Per config: its description, the seeds finished and planned, stats of every metric."""
    planned = len(results["protocol"]["seeds"])
    out = {}
    for config in results["configs"]:
        rows = [r for r in results["runs"] if r["config"] == config["name"]]
        metrics = {}
        for key, _, path in METRICS:
            metrics[key] = stats([v for r in rows if (v := value(r, path)) is not None])
        lrs = sorted(
            {
                (r["settings"]["lr"], r["settings"].get("init_std"), r["settings"]["lr_source"])
                for r in rows
            },
            key=str,
        )
        tasks = rows[0]["oracle"]["per_task_r1"] if rows else {}
        out[config["name"]] = {
            "config": config,
            "seeds": sorted(r["seed"] for r in rows),
            "planned": planned,
            "lr": [{"lr": lr, "init_std": std, "source": source} for lr, std, source in lrs],
            "metrics": metrics,
            "per_task_r1": {t: stats([r["oracle"]["per_task_r1"][t] for r in rows]) for t in tasks},
            "swap_matrix_mean": mean_matrix(rows),
        }
    return out


def mean_matrix(rows: list[dict]) -> dict | None:
    """The swap matrix averaged over seeds (rows: data task, columns: prompt task)."""
    swaps = [r["swap"] for r in rows if r.get("swap")]
    if not swaps or any(s["tasks"] != swaps[0]["tasks"] for s in swaps):
        return None
    count = len(swaps[0]["tasks"])
    matrix = [
        [statistics.fmean(s["matrix"][i][j] for s in swaps) for j in range(count)]
        for i in range(count)
    ]
    return {"tasks": swaps[0]["tasks"], "seeds": len(swaps), "matrix": matrix}


def swap_lines(agg: dict[str, dict], names: list[str]) -> list[str]:
    """Markdown swap matrices of `names`: where L_task should show."""
    lines = []
    for name in names:
        swap = agg.get(name, {}).get("swap_matrix_mean")
        if not swap:
            continue
        lines += [
            "",
            f"Swap matrix of {name} (oracle R@1, mean of {swap['seeds']} seeds; row: test set, "
            "column: prompts):",
            "",
            "| test set \\ prompts | " + " | ".join(swap["tasks"]) + " |",
            "|---" * (len(swap["tasks"]) + 1) + "|",
        ]
        for task, row in zip(swap["tasks"], swap["matrix"], strict=True):
            lines.append(f"| {task} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    return lines


def paired(results: dict, a: str, b: str, path: str) -> dict | None:
    """a - b seed by seed on `path`; None when the two share no finished seed."""
    by_seed = {
        name: {r["seed"]: value(r, path) for r in results["runs"] if r["config"] == name}
        for name in (a, b)
    }
    seeds = sorted(
        s for s in by_seed[a] if by_seed[b].get(s) is not None and by_seed[a][s] is not None
    )
    if not seeds:
        return None
    diffs = [by_seed[a][s] - by_seed[b][s] for s in seeds]
    summary = stats(diffs)
    sem, n = summary["sem"], len(seeds)
    t = t_critical(n - 1) if n >= 2 else None
    passes = t is not None and (abs(summary["mean"]) > t * sem if sem else summary["mean"] != 0)
    return {
        "a": a,
        "b": b,
        "metric": path,
        "seeds": seeds,
        **summary,
        "t_critical_95": t,  # two-sided, n - 1 degrees of freedom
        "passes_t95": passes,
    }


def planned_comparisons(results: dict) -> list[tuple[str, str, str, str]]:
    """(question, a, b, metric path) of the protocol, for the configs this run has."""
    configs = {c["name"]: c for c in results["configs"]}
    matched = next((c for c in configs.values() if c.get("matched_to")), None)
    head = matched["matched_to"] if matched else "lpi-R4"
    if head not in configs:
        return []
    shape = configs[head]
    dense = next(
        (
            c["name"]
            for c in configs.values()
            if c["method"] == "dense"
            and (c["layers"], c["tokens"]) == (shape["layers"], shape["tokens"])
        ),
        None,
    )
    same_rank = f"lpi-no-interaction-R{shape['rank']}"
    plan = [
        ("LPI vs zero-shot, oracle R@1", head, "zero-shot", "oracle.r1"),
        ("LPI vs the shared prompt, oracle R@1", head, "shared", "oracle.r1"),
        ("shared prompt vs LPI, oracle forgetting", "shared", head, "oracle.forgetting"),
        ("LPI vs dense prompts of its shape, oracle R@1", head, dense, "oracle.r1"),
        (
            "interaction vs none at matched parameters, oracle R@1",
            head,
            matched and matched["name"],
            "oracle.r1",
        ),
        ("interaction vs none at the same rank, oracle R@1", head, same_rank, "oracle.r1"),
        ("L_layer on vs off, oracle R@1", head, "lpi-no-layer-R" + str(shape["rank"]), "oracle.r1"),
        ("L_task on vs off, swap gap", head, "lpi-no-task-R" + str(shape["rank"]), "swap.gap"),
        ("L_task on vs off, routed R@1", head, "lpi-no-task-R" + str(shape["rank"]), "routed.r1"),
        ("LPI vs zero-shot, routed R@1", head, "zero-shot", "routed.r1"),
    ]
    plan += [  # the goal: LPI near dense (J, N) at a third of its parameters or fewer
        (
            f"LPI R{c['rank']}, R_i = 1, vs dense prompts of its shape, oracle R@1",
            c["name"],
            dense,
            "oracle.r1",
        )
        for c in configs.values()
        if c["family"] == "lpi-Ri1"
    ]
    denser = [c for c in configs.values() if c["method"] == "dense"]
    for name, label in ((head, ""), (f"lpi-R{shape['rank']}-Ri1", ", R_i = 1,")):
        own = configs.get(name, {}).get("parameters_per_task")  # the Pareto question, one budget
        if denser and own is not None:
            near = min(denser, key=lambda d: abs(d["parameters_per_task"] - own))["name"]
            question = f"LPI R{shape['rank']}{label} vs the dense shape nearest its parameters"
            plan.append((question + ", oracle R@1", name, near, "oracle.r1"))
    return [(q, a, b, m) for q, a, b, m in plan if a in configs and b in configs]


def comparisons(results: dict) -> list[dict]:
    out = []
    for question, a, b, path in planned_comparisons(results):
        result = paired(results, a, b, path)
        out.append({"question": question, "a": a, "b": b, "metric": path, "result": result})
    return out


def cell(metric: dict, digits: int, ran: bool) -> str:
    """mean ± std; "n/a" where finished runs have no such number (zero-shot's swap), "missing"
    where no run has finished."""
    if metric["n"] == 0:
        return "n/a" if ran else "missing"
    text = f"{metric['mean']:.{digits}f}"
    return text if metric["std"] is None else f"{text} ± {metric['std']:.{digits}f}"


def table(agg: dict[str, dict]) -> str:
    shown = [k for k, *_ in METRICS if k not in ("swap_off", "routed_rsum")]
    headers = {k: h for k, h, _ in METRICS}
    lines = [
        "| config | params/task | seeds | " + " | ".join(headers[k] for k in shown) + " | R@1 SE |",
        "|---" * (len(shown) + 4) + "|",
    ]
    for name, entry in agg.items():
        metrics = entry["metrics"]
        sem = metrics["r1"]["sem"]
        ran = bool(entry["seeds"])
        cells = [cell(metrics[k], 0 if k == "seconds" else 2, ran) for k in shown]
        lines.append(
            f"| {name} | {entry['config']['parameters_per_task']:,} "
            f"| {len(entry['seeds'])}/{entry['planned']} | "
            + " | ".join(cells)
            + f" | {'-' if sem is None else f'{sem:.2f}'} |"
        )
    return "\n".join(lines)


def comparison_lines(found: list[dict]) -> list[str]:
    lines = []
    for c in found:
        r = c["result"]
        if r is None:
            lines.append(
                f"- {c['question']}: {c['a']} vs {c['b']} on {c['metric']}: no common seed"
            )
            continue
        se = "-" if r["sem"] is None else f"{r['sem']:.2f}"
        side = "above" if r["mean"] > 0 else "below"
        verdict = f"{c['a']} {side}, passes" if r["passes_t95"] else "does not pass: no claim"
        t = "-" if r["t_critical_95"] is None else f"{r['t_critical_95']:.2f}"
        lines.append(
            f"- {c['question']}: {c['a']} - {c['b']} on {c['metric']} = {r['mean']:+.2f} "
            f"(SE {se}, n = {r['n']}, t {t}): {verdict}"
        )
    return lines


def lr_lines(results: dict, agg: dict[str, dict]) -> list[str]:
    sweep = results["protocol"].get("sweep")
    defaults = results["protocol"].get("default_lr") or {}
    fallback = ", ".join(f"{family} {lr:g}" for family, lr in defaults.items())
    fallback = f"the trainer's defaults ({fallback})" if fallback else "the trainer's defaults"
    if "lr" in results["protocol"]:  # results of the version that had an --lr flag
        fallback = f"--lr {results['protocol']['lr']}"
    head = f"from the sweep in {sweep}, {fallback} where it names none" if sweep else fallback
    lines = [f"Learning rates and init std ({head}; init std: the default where not swept):"]
    for name, entry in agg.items():
        lrs = ", ".join(
            f"lr {x['lr']:g}"
            + (f", init std {x['init_std']:g}" if x["init_std"] else "")
            + f" ({x['source']})"
            for x in entry["lr"]
        )
        lines.append(f"  - {name}: {lrs or 'not run yet'}")
    return lines


def load_range(runs: list[dict]) -> str:
    loads = [r["load_average"][0] for r in runs if r.get("load_average")]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "not recorded"


def markdown(results: dict, agg: dict[str, dict], found: list[dict]) -> str:
    protocol, host = results["protocol"], results["machine"]
    matched = next((c for c in results["configs"] if c.get("matched_to")), None)
    tasks = results["runs"][0]["tasks"] if results["runs"] else []
    parts = [
        f"Command: `{protocol['command']}`",
        f"Machine: {host['platform']}, {host['cpus']} CPUs, GPU {host['gpu'] or 'none'}, "
        f"{host['torch_threads']} torch threads (OMP_NUM_THREADS={host['omp_num_threads']}); "
        f"1-minute load average at the end of each run {load_range(results['runs'])}.",
        f"Seeds {protocol['seeds']}, {protocol['epochs']} epochs per task, backbone "
        f"{protocol['backbone']}; tasks {', '.join(tasks) or 'none finished yet'}. "
        "Cells are mean ± std over the finished seeds; R@K is the mean "
        "of both directions over the tasks after the last one; rsum sums the six recalls.",
        "",
        table(agg),
        "",
    ]
    if matched:
        parts.append(
            f"Matched parameters: {matched['name']} ({matched['parameters_per_task']:,} per task) "
            f"is the no-interaction rank closest to {matched['matched_to']}'s count."
        )
    parts += [
        "",
        "Comparisons (paired t-test by seed: a difference counts above t SE, t the two-sided "
        "95% critical value for n - 1 degrees of freedom):",
    ]
    parts += comparison_lines(found)
    task_pair = [c for c in found if c["metric"] == "swap.gap"]
    parts += swap_lines(agg, [task_pair[0]["a"], task_pair[0]["b"]] if task_pair else [])
    parts += per_task_lines(agg)
    parts += routing_lines(routing_summary(results))
    parts += ["", *lr_lines(results, agg)]
    if results["missing"]:
        parts += ["", f"Missing runs ({len(results['missing'])}): {', '.join(results['missing'])}"]
    return "\n".join(parts) + "\n"


def plot(agg: dict[str, dict], path: Path, title: str) -> None:
    """Final oracle R@1 against parameters per task: one curve per family, baselines beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5))
    for family in PARETO_FAMILIES:
        points = sorted(
            (e["config"]["parameters_per_task"], e["metrics"]["r1"], name)
            for name, e in agg.items()
            if e["config"]["family"] == family and e["metrics"]["r1"]["n"]
        )
        if not points:
            continue
        xs = [p[0] for p in points]
        ys = [p[1]["mean"] for p in points]
        errors = [p[1]["std"] or 0.0 for p in points]
        axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=family)
        for x, y, (_, _, name) in zip(xs, ys, points, strict=True):
            label = name.removesuffix("-Ri1").split("-")[-1]
            axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4))
    for name, entry in agg.items():
        if entry["config"]["family"] in ABLATIONS and entry["metrics"]["r1"]["n"]:
            r1 = entry["metrics"]["r1"]
            axes.errorbar(
                entry["config"]["parameters_per_task"],
                r1["mean"],
                yerr=r1["std"] or 0.0,
                marker="s",
                linestyle="none",
                capsize=3,
                label=name,
            )
    zero = agg.get("zero-shot")
    if zero and zero["metrics"]["r1"]["n"]:
        axes.axhline(zero["metrics"]["r1"]["mean"], color="grey", linestyle="--", label="zero-shot")
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters per task")
    axes.set_ylabel("final oracle R@1 (mean of both directions, %)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic.atomic_path(path) as temp:
        figure.savefig(temp, dpi=120, format="png")
    plt.close(figure)


def report(results_path: Path, out_dir: Path) -> dict:
    """Write the markdown, JSON and PNG into `out_dir`; the JSON's content."""
    results = json.loads(Path(results_path).read_text())
    agg = aggregate(results)
    found = comparisons(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(results, agg, found)
    atomic.write_text(out_dir / MARKDOWN, text)
    seeds = results["protocol"]["seeds"]
    plot(agg, out_dir / PNG, f"continual benchmark, {len(seeds)} seeds (error bars: std)")
    payload = {
        "protocol": results["protocol"],
        "machine": results["machine"],
        "aggregate": agg,
        "comparisons": found,
        "routing": routing_summary(results),
        "missing": results["missing"],
        "markdown": text,
    }
    atomic.write_json(out_dir / JSON_OUT, payload)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("results", type=Path, help="results.json of benchmarks/continual.py")
    parser.add_argument("--out-dir", type=Path, default=Path("docs"), help="where to write")
    args = parser.parse_args(argv)
    payload = report(args.results, args.out_dir)
    print(payload["markdown"], end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
