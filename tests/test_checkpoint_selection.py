"""benchmarks/checkpoint_selection.py: validation-selected runs paired per training seed with the CSV and the last epoch."""

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import checkpoint_selection  # noqa: E402

from evjax.config import load  # noqa: E402


def _write(path: Path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _fake_run(root: Path, seed: int, epoch: int, held_out: tuple, latest: tuple | None) -> Path:
    """A run dir with the files the script reads: metrics.csv, eval/ and (optionally) eval_latest/ metrics."""
    run = root / f"s{seed}"
    _write(run / "metrics.csv", ["epoch", "val_welfare", "val_cost", "val_violation_pct"],
           [[e, 3000.0 + e, 0.05, 20.0 + e] if e == epoch else [e, "nan", "nan", "nan"] for e in range(epoch + 2)])
    for name, figures in (("eval", held_out), ("eval_latest", latest)):
        if figures is not None:
            _write(run / name / "metrics.csv", ["method", "steps_any_violation_pct", "welfare_cny"],
                   [["fixed_upper", 46.1, 3815.0], ["cap_adaptive", *figures]])
    return run


def test_pairs_each_seed_with_the_csv_and_the_last_epoch(tmp_path, monkeypatch, capsys):
    runs = {0: (4, (20.0, 3800.0), (30.0, 3790.0)), 1: (9, (24.0, 3700.0), (28.0, 3750.0))}
    dirs = {_fake_run(tmp_path, seed, epoch, held, latest): seed for seed, (epoch, held, latest) in runs.items()}
    meta = lambda run_dir, kind: ({"epoch": runs[dirs[run_dir]][0]},  # noqa: E731
                                  load(None, [f"training.seed={dirs[run_dir]}"]))
    monkeypatch.setattr(checkpoint_selection.checkpoint, "restore_meta", meta)
    _write(tmp_path / "base.csv", ["training_seed", *checkpoint_selection.BASELINE_COLUMNS],
           [[0, 26.0, 3810.0], [1, 30.0, 3690.0]])
    out_csv = tmp_path / "out.csv"
    assert checkpoint_selection.main([*map(str, dirs), "--baseline", str(tmp_path / "base.csv"),
                                      "--csv", str(out_csv)]) == 0
    printed = capsys.readouterr().out
    # by hand: validation − paired = (20 − 26, 24 − 30) = −6 pp both seeds; welfare (−10, +10), mean 0
    assert "validation − paired selection over 2 seeds (95 % t): violating steps -6.0 ± 0.0 pp" in printed
    # validation − last epoch: (−10, −4) pp, mean −7; paired − last: (−4, +2), mean −1
    assert "validation selection − last epoch over 2 seeds (95 % t): violating steps -7.0 ±" in printed
    assert "paired selection − last epoch over 2 seeds (95 % t): violating steps -1.0 ±" in printed
    rows = list(csv.DictReader(out_csv.open()))
    assert [int(r["epoch"]) for r in rows] == [4, 9]
    assert float(rows[1]["val_welfare_cny"]) == 3009.0 and float(rows[1]["val_violation_pct"]) == 29.0
    assert float(rows[0]["latest_violation_pct"]) == 30.0 and float(rows[0]["paired_welfare_cny"]) == 3810.0


def _one_run(tmp_path, monkeypatch, seed: int) -> Path:
    """One fake run of ``seed`` (epoch 4 selected, no last-epoch evaluation) and a baseline CSV holding seed 0 only."""
    run = _fake_run(tmp_path, seed, 4, (20.0, 3800.0), None)
    monkeypatch.setattr(checkpoint_selection.checkpoint, "restore_meta",
                        lambda run_dir, kind: ({"epoch": 4}, load(None, [f"training.seed={seed}"])))
    _write(tmp_path / "base.csv", ["training_seed", *checkpoint_selection.BASELINE_COLUMNS], [[0, 26.0, 3810.0]])
    return run


def test_a_seed_missing_from_the_baseline_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    run = _one_run(tmp_path, monkeypatch, 3)
    assert checkpoint_selection.main([str(run), "--baseline", str(tmp_path / "base.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{tmp_path / 'base.csv'}: no row for training seed 3 ({run})"]


def test_without_a_last_epoch_evaluation_only_the_csv_pairing_is_printed(tmp_path, monkeypatch, capsys):
    run = _one_run(tmp_path, monkeypatch, 0)
    assert checkpoint_selection.main([str(run), "--baseline", str(tmp_path / "base.csv")]) == 0
    printed = capsys.readouterr().out
    assert not (run / "eval_latest").exists()
    assert "validation − paired selection over 1 seeds" in printed and "selection − last epoch" not in printed
    assert "| 20.0 % (26.0 %) | 3800 (3810) |" in printed  # no last-epoch figures in the row
