"""The continual report's per-task tables: oracle R@1 of every task per config, and where
routing by task keys goes wrong.

A mean over tasks hides which task gains, and one routing accuracy hides which task's queries
go astray. Every run of one seed routes with the same keys (K-Means of frozen features of the
same data), so one config's rows say it all: zero-shot's where it ran, else the first config
that has a routing confusion (`lpi.continual.evaluation.routing_confusion`, in each run's
bench.json row).
"""

from __future__ import annotations

import statistics

MODALITIES = ("image", "text")


def routing_summary(results: dict) -> dict | None:
    """Per task and modality: percent routed to the task itself and the most common wrong
    task with its percent, both means over seeds; None where no row has a confusion."""
    rows = [r for r in results["runs"] if r.get("routing_confusion")]
    if not rows:
        return None
    names = [r["config"] for r in rows]
    config = "zero-shot" if "zero-shot" in names else names[0]
    rows = [r for r in rows if r["config"] == config]
    tasks: dict[str, dict] = {}
    for task in rows[0]["tasks"]:
        tasks[task] = {}
        for modality in MODALITIES:
            shares = [r["routing_confusion"][modality][task] for r in rows]
            wrong = {t for share in shares for t in share if t != task}
            means = {t: statistics.fmean(share.get(t, 0.0) for share in shares) for t in wrong}
            worst = max(means, key=lambda t: (means[t], t), default=None)
            tasks[task][modality] = {
                "right": statistics.fmean(share.get(task, 0.0) for share in shares),
                "most_wrong": worst,
                "most_wrong_percent": means[worst] if worst else 0.0,
            }
    return {"config": config, "seeds": sorted(r["seed"] for r in rows), "tasks": tasks}


def routing_lines(summary: dict | None) -> list[str]:
    """A markdown table of `routing_summary`."""
    if summary is None:
        return []
    lines = [
        "",
        f"Routing per task ({summary['config']}, mean of seeds {summary['seeds']}): percent of "
        "each task's test queries routed to it, and where most of the rest go.",
        "",
        "| task | images right | images' most common wrong task | texts right | "
        "texts' most common wrong task |",
        "|---|---|---|---|---|",
    ]
    for task, entry in summary["tasks"].items():
        cells = []
        for modality in MODALITIES:
            e = entry[modality]
            wrong = f"{e['most_wrong']} ({e['most_wrong_percent']:.1f})" if e["most_wrong"] else "-"
            cells += [f"{e['right']:.1f}", wrong]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines


def per_task_lines(agg: dict[str, dict]) -> list[str]:
    """A markdown table of each config's final oracle R@1 per task (the aggregate's
    `per_task_r1`, mean over seeds): configs as rows, tasks as columns."""
    table = {name: entry["per_task_r1"] for name, entry in agg.items() if entry["per_task_r1"]}
    if not table:
        return []
    tasks = list(next(iter(table.values())))
    lines = [
        "",
        "Final oracle R@1 per task (mean of the finished seeds; each task's own test gallery):",
        "",
        "| config | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for name, row in table.items():
        cells = (f"{row[t]['mean']:.2f}" if t in row else "-" for t in tasks)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
