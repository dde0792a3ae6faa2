"""benchmarks/safety_while_learning.py --take: a variant's rows read from an earlier CSV instead of trained."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "safety_while_learning.py"
FIELDS = ["variant", "seed", "epoch", "cost", "cumulative_cost", "welfare_cny", "kappa"]


def _earlier(path: Path) -> None:
    """CEM seed 0 costs 0.1 then 0.3 (welfare 100, 200), seed 1 costs 0.2 twice (welfare 300, 500); CCEM seed 0 too."""
    _write(path, [("cem", 0, 0, 0.1, 0.1, 100.0), ("cem", 0, 1, 0.3, 0.4, 200.0), ("cem", 1, 0, 0.2, 0.2, 300.0),
                  ("cem", 1, 1, 0.2, 0.4, 500.0), ("ccem", 0, 0, 0.0, 0.0, 100.0), ("ccem", 0, 1, 0.1, 0.1, 100.0)])


def _write(path: Path, rows: list[tuple]) -> None:
    """A safety_while_learning.csv of (variant, seed, epoch, cost, cumulative cost, welfare) rows, kappa 0."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        writer.writerows([*row, 0.0] for row in rows)


def _run(tmp_path, *args):
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), *args],
                          capture_output=True, text=True)


def test_taken_variant_is_summarised_as_if_trained(tmp_path):
    _earlier(tmp_path / "earlier.csv")
    done = _run(tmp_path, "--variants", "cem", "--seeds", "0", "1", "--take", f"cem={tmp_path / 'earlier.csv'}")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "safety_while_learning.json").read_text())
    cem = summary["variants"]["cem"]
    assert cem["cumulative_cost_per_seed"] == [0.4, 0.4] and cem["cost_ratio_to_cem"] == 1.0
    assert cem["last10_welfare_per_seed"] == [150.0, 400.0]  # both epochs are within the last 10
    assert summary["taken"] == {"cem": str(tmp_path / "earlier.csv")} and summary["run_seconds"] == {}
    assert summary["wall_seconds"] is None  # nothing was trained in this call
    with (tmp_path / "out" / "safety_while_learning.csv").open() as f:
        assert [(r["variant"], r["seed"], r["epoch"]) for r in csv.DictReader(f)] == [
            ("cem", "0", "0"), ("cem", "0", "1"), ("cem", "1", "0"), ("cem", "1", "1")]
    assert not (tmp_path / "out" / "runs" / "cem-seed0").exists()  # nothing trained


def test_taking_a_seed_the_file_lacks_names_it(tmp_path):
    _earlier(tmp_path / "earlier.csv")
    done = _run(tmp_path, "--variants", "ccem", "--seeds", "0", "1", "--take", f"ccem={tmp_path / 'earlier.csv'}")
    assert done.returncode != 0 and "ccem" in done.stderr and "[1]" in done.stderr
    assert _run(tmp_path, "--take", "cem=missing.csv").returncode == 2  # command-line misuse


def test_ratio_to_cem_has_fieller_set_over_paired_seeds(tmp_path):
    """CCEM costs exactly half of CEM on each seed (0.2 against 0.4): every paired difference N - 0.5 D is 0, so
    Fieller's set is the single point 0.5. CEM against itself is [1, 1]; CCEM's last-10 welfare (100 and 100 against
    150 and 400) has the ratio 100 / 275, and with two seeds CEM's mean welfare is not resolved from 0 (275 against
    t * s / sqrt(2) = 12.71 * 176.8 / 1.41 = 1588), so the set is unbounded: every R outside an interval."""
    path = tmp_path / "earlier.csv"
    _write(path, [("cem", 0, 0, 0.1, 0.1, 100.0), ("cem", 0, 1, 0.3, 0.4, 200.0), ("cem", 1, 0, 0.2, 0.2, 300.0),
                  ("cem", 1, 1, 0.2, 0.4, 500.0), ("ccem", 0, 0, 0.0, 0.0, 100.0), ("ccem", 0, 1, 0.2, 0.2, 100.0),
                  ("ccem", 1, 0, 0.1, 0.1, 100.0), ("ccem", 1, 1, 0.1, 0.2, 100.0)])
    done = _run(tmp_path, "--variants", "cem", "ccem", "--seeds", "0", "1", "--take", f"cem={path}",
                "--take", f"ccem={path}")
    assert done.returncode == 0, done.stderr
    variants = json.loads((tmp_path / "out" / "safety_while_learning.json").read_text())["variants"]
    cost = variants["ccem"]["cost_ratio_interval"]
    assert variants["ccem"]["cost_ratio_to_cem"] == 0.5 and cost["kind"] == "bounded"
    assert abs(cost["low"] - 0.5) < 1e-9 and abs(cost["high"] - 0.5) < 1e-9
    assert variants["cem"]["cost_ratio_interval"]["low"] == variants["cem"]["cost_ratio_interval"]["high"] == 1.0
    welfare = variants["ccem"]["welfare_ratio_interval"]
    assert abs(variants["ccem"]["welfare_ratio_to_cem"] - 100 / 275) < 1e-12
    assert welfare["kind"] == "outside" and "welfare 100 CNY (0.364 x CEM (95 % set unbounded))" in done.stdout
    assert "0.500 x CEM [0.50, 0.50]" in done.stdout


def test_finished_run_reports_the_seconds_it_recorded(tmp_path):
    """A run with a ``done`` file is not trained again; its recorded wall seconds come back (NaN for an older
    file without them), so a summary written again keeps the training's time."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from safety_while_learning import train_one
    finally:
        sys.path.remove(str(SCRIPT.parent))
    run_dir = tmp_path / "cem-seed0"
    run_dir.mkdir()
    (run_dir / "done").write_text("1565.4\n")
    assert train_one(run_dir, ["no.such_key=1"], None, tmp_path / "log") == 1565.4
    (run_dir / "done").write_text("ok\n")
    assert math.isnan(train_one(run_dir, [], None, tmp_path / "log"))
    assert not (tmp_path / "log").exists()  # no training started
