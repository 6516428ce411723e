"""benchmarks/continual.py and continual_report.py end to end, in miniature.

Two configs (LPI and zero-shot) x two seeds on a tiny synthetic dataset and the tiny preset's
random weights, one epoch: this checks the pipeline (every run recorded, resume, the report,
the swap matrix), not the numbers, which mean nothing at this size.
"""

from __future__ import annotations

import importlib
import json
import math
import shlex
from pathlib import Path

import pytest

from lpi.continual.methods import DENSE_LR, LPI_LR

REPO = Path(__file__).resolve().parents[1]
TINY = shlex.split(
    "--backbone tiny --suite classic --tasks 2 --fashion-groups --train-per-task 16 "
    "--test-per-task 8 --image-size 32 --epochs 1 --batch-size 8 --layers 2 --tokens 4 "
    "--configs lpi-R4 zero-shot --seeds 0 1 --device cpu"
)
RUNS = {"lpi-R4/seed-0", "lpi-R4/seed-1", "zero-shot/seed-0", "zero-shot/seed-1"}


@pytest.fixture(scope="module")
def scripts():
    """The two scripts as modules (they import `benchkit` from their own folder)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO / "benchmarks"))
        yield importlib.import_module("continual"), importlib.import_module("continual_report")


@pytest.fixture(scope="module")
def bench(scripts, tmp_path_factory):
    """A finished miniature benchmark: its folder; lpi's lr comes from a sweep file."""
    continual, _ = scripts
    out = tmp_path_factory.mktemp("continual")
    (out / "sweep").mkdir()
    (out / "sweep" / "sweep.json").write_text(
        json.dumps({"lpi": {"lr": 0.02, "init_std": 0.4, "score": 1.0}})
    )
    assert continual.main(["--out", str(out), "--sweep", str(out / "sweep"), *TINY]) == 0
    return out


def args_of(bench: Path) -> list[str]:
    return ["--out", str(bench), "--sweep", str(bench / "sweep"), *TINY]


def test_results_hold_every_run_with_its_time_and_lr(bench):
    results = json.loads((bench / "results.json").read_text())
    runs = {row["id"]: row for row in results["runs"]}
    assert set(runs) == RUNS
    assert not RUNS & set(results["missing"])  # the configs not asked for stay listed missing
    assert "dense-J4N8/seed-0" in results["missing"]
    for row in runs.values():
        assert row["seconds"]["train"] >= 0 and row["seconds"]["this_attempt"] > 0
        assert 0 <= row["oracle"]["r1"] <= row["oracle"]["r5"] <= row["oracle"]["r10"] <= 100
        assert row["oracle"]["rsum"] == pytest.approx(
            2 * (row["oracle"]["r1"] + row["oracle"]["r5"] + row["oracle"]["r10"])
        )  # rsum is the sum of six recalls, R@K the mean of two: float sums, hence approx
    assert runs["lpi-R4/seed-0"]["settings"]["lr"] == 0.02
    assert runs["lpi-R4/seed-0"]["settings"]["lr_source"] == "sweep: lpi"
    assert runs["lpi-R4/seed-0"]["settings"]["init_std"] == 0.4
    run = json.loads((bench / "runs/lpi-R4/seed-0/run.json").read_text())["config"]
    assert run["lr"] == 0.02 and run["prompt"]["init_std"] == 0.4  # what the trainer used
    # zero-shot trains nothing; it records its family's (LPI's) sweep point like the ablations
    assert runs["zero-shot/seed-0"]["settings"]["lr_source"] == "sweep: lpi"
    assert runs["zero-shot/seed-0"]["swap"] is None  # no prompts to swap
    # seeds change the data: the two seeds' test galleries differ
    lpi = [
        json.loads((bench / "runs/lpi-R4" / f"seed-{s}" / "run.json").read_text()) for s in (0, 1)
    ]
    assert lpi[0]["config"]["manifest"] != lpi[1]["config"]["manifest"]
    assert lpi[0]["config"]["seed"] == 0 and lpi[1]["config"]["seed"] == 1


def test_swap_diagonal_is_the_runs_oracle_recall(bench):
    for seed in (0, 1):
        folder = bench / "runs/lpi-R4" / f"seed-{seed}"
        swap = json.loads((folder / "swap.json").read_text())
        oracle = json.loads((folder / "eval.json").read_text())["final"]["r1"]["oracle"]
        # The same encoder calls in the same order as the evaluation: equal, not just close.
        assert [swap["matrix"][i][i] for i in range(2)] == [oracle[t] for t in swap["tasks"]]


def test_a_rerun_skips_finished_runs_and_finishes_a_killed_one(scripts, bench, monkeypatch):
    continual, _ = scripts
    folder = bench / "runs/lpi-R4/seed-1"
    before = json.loads((folder / "bench.json").read_text())
    # Killed while training its second task: run.json holds one task, no eval, no row.
    state = json.loads((folder / "run.json").read_text())
    state["done"], state["results"] = state["done"][:1], state["results"][:1]
    (folder / "run.json").write_text(json.dumps(state))
    for name in ("bench.json", "eval.json", "swap.json"):
        (folder / name).unlink()
    trained = []
    real = continual.run_training
    monkeypatch.setattr(continual, "run_training", lambda c: trained.append(c) or real(c))
    assert continual.main(args_of(bench)) == 0
    assert [(c.method, c.seed) for c in trained] == [("lpi", 1)]  # only the killed run
    after = json.loads((folder / "bench.json").read_text())
    assert after["tasks"] == before["tasks"]
    first = before["tasks"][0]  # reloaded from its checkpoint, not retrained: the same recall
    assert after["oracle"]["per_task_r1"][first] == before["oracle"]["per_task_r1"][first]
    assert len(json.loads((folder / "run.json").read_text())["results"]) == 2
    trained.clear()
    assert continual.main(args_of(bench)) == 0  # everything finished: nothing trains
    assert trained == []
    results = json.loads((bench / "results.json").read_text())
    assert {row["id"] for row in results["runs"]} == RUNS


def test_a_finished_run_with_other_settings_is_refused(scripts, bench):
    continual, _ = scripts
    with pytest.raises(SystemExit, match="other settings"):
        continual.main([*args_of(bench), "--batch-size", "3"])


def test_subsets_select_by_config_and_glob(scripts, bench):
    continual, _ = scripts
    args = continual.parse_args(["--out", str(bench), *TINY, "--only", "lpi-*/seed-1"])
    configs = continual.make_configs(args, continual.load_backbone("tiny"))
    assert [(c.name, s) for c, s in continual.selected(args, configs)] == [("lpi-R4", 1)]
    matched = [c for c in configs if c.matched_to]
    assert len(matched) == 1 and matched[0].matched_to == "lpi-R4"
    counts = {c.rank: c.parameters_per_task for c in configs if c.family == "lpi-no-interaction"}
    target = next(c.parameters_per_task for c in configs if c.name == "lpi-R4")
    # no listed no-interaction rank is closer to lpi-R4's count than the matched one
    assert all(
        abs(count - target) >= abs(matched[0].parameters_per_task - target)
        for count in counts.values()
    )
    # LPI at R_i = 1: the same factors, a rank-1 interaction, so fewer parameters than R_i = 4
    low = {c.rank: c for c in configs if c.family == "lpi-Ri1"}
    assert sorted(low) == [1, 2, 4] and all(c.interaction_rank == 1 for c in low.values())
    full = {c.rank: c.parameters_per_task for c in configs if c.family == "lpi"}
    assert all(low[k].parameters_per_task < full[k] for k in low)
    assert low[4].parameters_per_task > counts[4]  # still more than no interaction at all
    at_one = continual.parse_args([*TINY, "--interaction-rank", "1"])
    names = [c.name for c in continual.make_configs(at_one, continual.load_backbone("tiny"))]
    assert not [n for n in names if n.endswith("-Ri1")]  # lpi-R{k} already has R_i = 1


def test_the_report_renders_partial_results(scripts, bench, tmp_path):
    _, report = scripts
    payload = report.report(bench / "results.json", tmp_path)
    text = (tmp_path / report.MARKDOWN).read_text()
    assert "| lpi-R4 | " in text and "| 2/2 |" in text
    assert "| dense-J4N8 |" in text and "missing" in text  # not run: shown missing
    assert "LPI vs zero-shot, oracle R@1" in text
    assert (tmp_path / report.PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / report.JSON_OUT).read_text())
    r1 = saved["aggregate"]["lpi-R4"]["metrics"]["r1"]
    assert r1["n"] == 2 and len(r1["values"]) == 2
    routing = saved["routing"]  # per task, from zero-shot's rows: what routing accuracy hides
    assert routing["config"] == "zero-shot" and routing["seeds"] == [0, 1]
    rows = [json.loads((bench / f"runs/zero-shot/seed-{s}/bench.json").read_text()) for s in (0, 1)]
    for task, entry in routing["tasks"].items():
        for modality in ("image", "text"):
            shares = [row["routing_confusion"][modality][task] for row in rows]
            assert sum(shares[0].values()) == pytest.approx(100.0)
            right = entry[modality]["right"]
            assert right == pytest.approx((shares[0].get(task, 0) + shares[1].get(task, 0)) / 2)
    assert "Routing per task (zero-shot" in text
    lpi = [json.loads((bench / f"runs/lpi-R4/seed-{s}/bench.json").read_text()) for s in (0, 1)]
    per_task = saved["aggregate"]["lpi-R4"]["per_task_r1"]
    assert list(per_task) == lpi[0]["tasks"]
    for task, r1 in per_task.items():
        assert r1["values"] == [row["oracle"]["per_task_r1"][task] for row in lpi]
    assert saved["aggregate"]["dense-J4N8"]["per_task_r1"] == {}  # not run: no row
    assert "Final oracle R@1 per task" in text
    assert saved["aggregate"]["dense-J4N8"]["metrics"]["r1"]["mean"] is None
    comparison = next(c for c in payload["comparisons"] if c["b"] == "zero-shot")
    assert comparison["result"]["seeds"] == [0, 1]
    counts = {name: e["config"]["parameters_per_task"] for name, e in saved["aggregate"].items()}
    for name in ("lpi-R4", "lpi-R4-Ri1"):  # the Pareto question at one budget
        (near,) = [
            c for c in payload["comparisons"] if c["a"] == name and "nearest" in c["question"]
        ]
        gaps = {d: abs(counts[d] - counts[name]) for d in counts if d.startswith("dense-")}
        assert gaps[near["b"]] == min(gaps.values())


def test_paired_comparison_needs_the_t_critical_value(scripts):
    _, report = scripts
    rows = [
        {"config": name, "seed": seed, "oracle": {"r1": value}}
        for name, values in (("a", [10.0, 12.0, 14.0]), ("b", [9.0, 10.0, 11.0]))
        for seed, value in enumerate(values)
    ]
    result = report.paired({"runs": rows}, "a", "b", "oracle.r1")
    # differences 1, 2, 3: mean 2, std 1, SE 1/sqrt(3) = 0.577: 2 SE = 1.155 < 2 would claim
    # it, but t(2 df) = 4.303 and 4.303 SE = 2.48 > 2: no claim from 3 seeds this noisy.
    assert result["mean"] == pytest.approx(2.0) and result["sem"] == pytest.approx(3**-0.5)
    assert result["t_critical_95"] == pytest.approx(4.3027, abs=1e-4)
    assert not result["passes_t95"]
    for row, value in zip(rows[3:], [8.0, 10.1, 11.9], strict=True):
        row["oracle"]["r1"] = value  # differences 2, 1.9, 2.1: SE 0.058, 4.303 SE = 0.25 < 2
    assert report.paired({"runs": rows}, "a", "b", "oracle.r1")["passes_t95"]
    assert report.paired({"runs": rows[:1]}, "a", "b", "oracle.r1") is None


def _t_cdf(x: float, df: int, steps: int = 4000) -> float:
    """P(T <= x) for x >= 0: 1/2 plus Simpson's rule over Student's t density on [0, x]."""
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    h = x / steps
    total = 0.0
    for i in range(steps + 1):
        weight = 1 if i in (0, steps) else 4 if i % 2 else 2
        total += weight * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2)
    return 0.5 + norm * total * h / 3


def test_t_critical_values_against_the_density(scripts):
    """Each tabled value (and the expansion past the table) puts 2.5% in the upper tail, to
    within the table's 4 decimals (the density is at most 0.4 there: 4e-5 in probability)."""
    _, report = scripts
    for df in [*range(1, 31), 40, 120]:
        assert _t_cdf(report.t_critical(df), df) == pytest.approx(0.975, abs=5e-5), df


def test_data_generated_with_other_flags_is_refused_not_reused(scripts, tmp_path):
    continual, _ = scripts
    args = continual.parse_args(["--out", str(tmp_path), *TINY])
    manifest = continual.prepare_data(args, 3, 2)
    record = manifest.parent / "data.json"
    assert json.loads(record.read_text())["image_size"] == 32
    stamp = manifest.stat().st_mtime_ns
    assert continual.prepare_data(args, 3, 1) == manifest  # fewer pretraining images serve
    assert manifest.stat().st_mtime_ns == stamp  # reused, not regenerated
    with pytest.raises(SystemExit, match=r"data\.json: .*pretrain_images 2 -> 5"):
        continual.prepare_data(args, 3, 5)
    other = continual.parse_args(["--out", str(tmp_path), *TINY, "--image-size", "16"])
    with pytest.raises(SystemExit, match="image_size 32 -> 16") as err:
        continual.prepare_data(other, 3, 2)
    assert str(record) in str(err.value)
    record.unlink()  # data without its record: refused too, not trusted
    with pytest.raises(SystemExit, match="no readable record"):
        continual.prepare_data(args, 3, 2)


def test_fashion_groups_follow_the_synthetic_tasks(scripts, tmp_path):
    from lpi.continual.data import fashion_mnist
    from lpi.continual.data.manifest import read_manifest, tasks

    if not fashion_mnist.available():
        pytest.skip(f"{fashion_mnist.PACKAGE} is not installed")
    continual, _ = scripts
    args = continual.parse_args(
        ["--out", str(tmp_path), *TINY, "--fashion-groups", "tops", "--val-per-task", "0"]
    )
    manifest = continual.prepare_data(args, 3, 1)
    assert tasks(read_manifest(manifest)) == ["shapes-colours", "textures", "tops"]
    similarity = json.loads((manifest.parent / "task_similarity.json").read_text())
    assert "tops" in json.dumps(similarity)  # the combined sequence's true similarity


def test_swap_matrices_average_over_seeds(scripts):
    _, report = scripts
    rows = [
        {"swap": {"tasks": ["a", "b"], "matrix": [[10.0, 2.0], [4.0, 20.0]]}},
        {"swap": {"tasks": ["a", "b"], "matrix": [[12.0, 4.0], [6.0, 22.0]]}},
        {"swap": None},  # zero-shot: nothing to average
    ]
    mean = report.mean_matrix(rows)
    assert mean == {"tasks": ["a", "b"], "seeds": 2, "matrix": [[11.0, 3.0], [5.0, 21.0]]}
    lines = report.swap_lines({"lpi-R4": {"swap_matrix_mean": mean}}, ["lpi-R4", "absent"])
    assert "| a | 11.00 | 3.00 |" in lines and "| b | 5.00 | 21.00 |" in lines


def test_a_method_the_sweep_skips_takes_its_familys_choice_or_the_trainer_default(scripts):
    continual, _ = scripts
    args = continual.parse_args([])
    points = {"lpi": {"lr": 0.02, "init_std": 0.4}, "dense": {"lr": 0.002}}
    config = {c.name: c for c in continual.make_configs(args, continual.load_backbone("tiny"))}
    for name in ("lpi-no-task-R4", "shared", "zero-shot"):  # LPI's factors or nothing
        recipe = continual.learning_rate(config[name], points)
        assert recipe == {"lr": 0.02, "init_std": 0.4, "lr_source": "sweep: lpi"}
    dense = continual.learning_rate(config["dense-J1N2"], points)
    assert dense == {"lr": 0.002, "init_std": None, "lr_source": "sweep: dense"}
    for name, method, lr in (("dense-J1N2", "dense", DENSE_LR), ("shared", "shared", LPI_LR)):
        recipe = continual.learning_rate(config[name], {})
        assert recipe == {"lr": lr, "init_std": None, "lr_source": f"default for {method}"}


def test_refit_keys_at_the_runs_own_count_change_nothing(bench, tmp_path, capsys):
    """benchmarks/continual_centres.py over runs re-evaluated with keys refit at the trainer's
    own count: the same fit as the saved keys, so every figure matches and the gain is 0."""
    import shutil

    from lpi.evaluate import main as evaluate_main

    folder = tmp_path / "bench"
    shutil.copytree(bench / "runs", folder / "runs")
    for run in sorted((folder / "runs").glob("*/seed-*")):
        assert evaluate_main([str(run), "--key-centres", "5", "--device", "cpu"]) == 0
    centres = importlib.import_module("continual_centres")
    centres.main([str(folder), "--centres", "5", "--out", str(folder / "centres.json")])
    rows = {r["config"]: r for r in json.loads((folder / "centres.json").read_text())["configs"]}
    assert set(rows) == {"lpi-R4", "zero-shot"}
    for row in rows.values():
        assert row["seeds"] == [0, 1]
        assert row["refit"] == row["saved"]
        assert row["routed_r1_gain"]["values"] == [0.0, 0.0]
        assert row["routed_r1_gain"]["passes_t95"] is False
    assert "lpi-R4" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"no run has eval-centres-7\.json"):
        centres.main([str(folder), "--centres", "7"])


def _report(routed: list[float], oracle: float, image: float, text: float) -> dict:
    """The parts of an eval.json that continual_centres reads, two tasks."""
    return {
        "final": {
            "r1": {
                "routed": dict(zip("ab", routed, strict=True)),
                "oracle": {"a": oracle, "b": oracle},
            }
        },
        "routing_accuracy_final": {"image": image, "text": text},
    }


def test_refit_gains_are_paired_by_seed(scripts, tmp_path):
    """Made-up reports: refit minus saved routed R@1 per seed, never across seeds."""
    centres = importlib.import_module("continual_centres")
    folder = tmp_path / "bench"
    made = {0: ([10.0, 12.0], [12.0, 14.0]), 1: ([20.0, 20.0], [21.0, 23.0])}  # gains 2, 2
    for seed, (saved, refit) in made.items():
        run = folder / "runs" / "lpi-R4" / f"seed-{seed}"
        run.mkdir(parents=True)
        (run / "eval.json").write_text(json.dumps(_report(saved, 30.0, 80.0, 85.0)))
        (run / "eval-centres-20.json").write_text(json.dumps(_report(refit, 30.0, 90.0, 95.0)))
    (folder / "runs" / "dense-J4N8" / "seed-0").mkdir(parents=True)  # no refit report: left out
    centres.main([str(folder), "--centres", "20", "--out", str(folder / "c.json")])
    (row,) = json.loads((folder / "c.json").read_text())["configs"]
    assert row["config"] == "lpi-R4" and row["seeds"] == [0, 1]
    assert row["saved"]["routed_r1"]["values"] == [11.0, 20.0]
    assert row["refit"]["routed_r1"]["values"] == [13.0, 22.0]
    assert row["routed_r1_gain"]["values"] == [2.0, 2.0]
    # no spread: any non-zero mean passes, as in the report's paired test
    assert row["routed_r1_gain"]["sem"] == 0.0 and row["routed_r1_gain"]["passes_t95"] is True
    assert row["refit"]["image"]["mean"] == 90.0 and row["saved"]["text"]["mean"] == 85.0
