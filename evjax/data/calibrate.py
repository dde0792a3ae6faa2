"""Turn the Shenzhen spreadsheets into the small figure files evjax ships.

Host side, not jittable. ``python -m evjax.data.calibrate --source ../shared/paper_data``
reads the three spreadsheets, cleans the charging sessions (SPEC 6) and writes to
``evjax/data/figures`` (or ``--out``):

- ``profiles.npz``: per-day quarter-hour station power (kW) from ``CSs_load.xlsx``
  (``dates`` [D], ``power_kw`` [D, 96]); days with a missing value or zero total
  power are dropped.
- ``ev_attributes.npz``: a bootstrap resample (fixed seed) of whole cleaned
  session rows, quantised, columns capacity_kwh, start_soc, target_soc,
  duration_h, laxity_h (SOC as fractions).
- ``summary.json``: row counts per cleaning rule, the service-time mean and
  squared coefficient of variation of the cleaned sessions, the time-of-day
  shape of the raw orders in ``EV_data1.xlsx`` and other checks.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import unicodedata
from pathlib import Path
from typing import Sequence

import numpy as np

from evjax.cli import ArgumentParser, entry_point
from evjax.data import ATTRIBUTE_COLUMNS, FIGURES_DIR
from evjax.errors import UserError
MAX_CAPACITY_KWH = 200.0  # SPEC 6: larger estimated capacities are not passenger EVs
RESAMPLE_ROWS = 4096
RESAMPLE_SEED = 20240501

SESSION_COLUMNS = {  # wanted name -> normalised header fragments, first match wins
    "energy_kwh": ("chargedenergy",),
    "duration_min": ("time(min)", "chargingtime(min)"),
    "start_soc_pct": ("start-soc",),
    "end_soc_pct": ("end-soc",),
    "capacity_kwh": ("estimatedbatterycapacity",),
    "laxity_min": ("laxitytime",),
}
ORDER_COLUMNS = {
    "order_time": ("timetoorder",),
    "energy_kwh": ("chargedenergy",),
    "abnormal": ("是否异常结算",),
}


def _normalise_header(name) -> str:
    """NFKC folds full-width brackets to ASCII; spaces go, case folds."""
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", str(name))).lower()


def find_columns(frame, wanted: dict[str, tuple[str, ...]], file: Path) -> dict[str, str]:
    """Map each wanted name to the frame's real header, or raise naming the missing one."""
    headers = {_normalise_header(c): c for c in frame.columns}
    found = {}
    for name, fragments in wanted.items():
        match = next((headers[h] for frag in fragments for h in headers if h == frag or h.startswith(frag)), None)
        if match is None:
            raise UserError(f"{file}: no column for {name} (looked for a header like {fragments[0]!r}; "
                            f"headers are {list(frame.columns)})")
        found[name] = match
    return found


def _read_excel(path: Path):
    import pandas as pd

    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return pd.read_excel(path)
    except Exception as exc:  # openpyxl raises many types for a damaged file
        raise UserError(f"{path}: cannot read spreadsheet ({exc.__class__.__name__}: {exc})") from None


def clean_sessions(path: Path) -> tuple[np.ndarray, dict[str, int]]:
    """Cleaned session attributes [Q, 5] (ATTRIBUTE_COLUMNS) and rows dropped per rule, in order."""
    frame = _read_excel(path)
    cols = find_columns(frame, SESSION_COLUMNS, path)
    data = {k: frame[c].to_numpy(dtype=float) for k, c in cols.items()}
    keep = np.ones(len(frame), bool)
    dropped = {}
    rules = [
        ("missing_value", np.all([np.isfinite(v) for v in data.values()], axis=0)),
        ("capacity_over_200_kwh", (data["capacity_kwh"] > 0) & (data["capacity_kwh"] <= MAX_CAPACITY_KWH)),
        ("soc_outside_0_100", (data["start_soc_pct"] > 0) & (data["start_soc_pct"] <= 100)
         & (data["end_soc_pct"] > 0) & (data["end_soc_pct"] <= 100)),
        ("end_soc_not_above_start", data["end_soc_pct"] > data["start_soc_pct"]),
        ("non_positive_duration", data["duration_min"] > 0),
        ("negative_laxity", data["laxity_min"] >= 0),
    ]
    for name, ok in rules:
        dropped[name] = int(np.sum(keep & ~ok))
        keep &= ok
    table = np.stack([
        data["capacity_kwh"][keep],
        data["start_soc_pct"][keep] / 100.0,
        data["end_soc_pct"][keep] / 100.0,
        data["duration_min"][keep] / 60.0,
        data["laxity_min"][keep] / 60.0,
    ], axis=1)
    return table, dropped


def read_profiles(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Dates [D] (ISO strings), quarter-hour power [D, 96] in kW, and the number of days dropped."""
    frame = _read_excel(path)
    date_col = next((c for c in frame.columns if _normalise_header(c) in ("日期", "date")), None)
    if date_col is None:
        raise UserError(f"{path}: no date column (looked for '日期' or 'date')")
    quarter_cols = []
    for hour in range(24):
        for minute in (0, 15, 30, 45):
            label = f"{hour:02d}:{minute:02d}"
            col = next((c for c in frame.columns
                        if str(c).strip() in (label, f"{label}:00") or c == dt.time(hour, minute)), None)
            if col is None:
                raise UserError(f"{path}: no column for quarter hour {label}")
            quarter_cols.append(col)
    power = frame[quarter_cols].to_numpy(dtype=float)
    dates = np.array([str(d)[:10] for d in frame[date_col]])
    ok = np.all(np.isfinite(power), axis=1) & (power.sum(axis=1) > 0)
    order = np.argsort(dates[ok], kind="stable")
    return dates[ok][order], power[ok][order].astype(np.float32), int(np.sum(~ok))


def order_time_of_day(path: Path) -> dict:
    """Quarter-hour histogram of raw order times (shares) and counts from EV_data1."""
    import pandas as pd

    frame = _read_excel(path)
    cols = find_columns(frame, ORDER_COLUMNS, path)
    times = pd.to_datetime(frame[cols["order_time"]], errors="coerce")
    valid = times.notna().to_numpy()
    quarter = (times[valid].dt.hour * 4 + times[valid].dt.minute // 15).to_numpy()
    hist = np.bincount(quarter, minlength=96).astype(float)
    abnormal = frame[cols["abnormal"]].astype(str).str.strip().eq("是").to_numpy()
    return {
        "orders": int(len(frame)),
        "orders_with_time": int(valid.sum()),
        "abnormal_orders": int(abnormal.sum()),
        "order_share_per_quarter_hour": (hist / max(hist.sum(), 1)).round(5).tolist(),
        "first_order": str(times[valid].min())[:19],
        "last_order": str(times[valid].max())[:19],
    }


def resample_attributes(table: np.ndarray, rows: int = RESAMPLE_ROWS, seed: int = RESAMPLE_SEED) -> np.ndarray:
    """Bootstrap whole rows (keeps correlations) and quantise: 0.1 kWh, 1 % SOC, 1 min."""
    rng = np.random.default_rng(seed)
    sample = table[rng.integers(0, len(table), rows)]
    sample[:, 0] = np.round(sample[:, 0], 1)
    sample[:, 1:3] = np.round(sample[:, 1:3], 2)
    sample[:, 3:5] = np.round(sample[:, 3:5] * 60.0) / 60.0
    return sample.astype(np.float32)


def calibrate(source: Path, out: Path) -> dict:
    """Read the spreadsheets in ``source``, write the figure files to ``out``, return the summary."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise UserError(f"{source}: data folder not found")
    table, dropped = clean_sessions(source / "usable_data.xlsx")
    dates, power, days_dropped = read_profiles(source / "CSs_load.xlsx")
    orders = order_time_of_day(source / "EV_data1.xlsx")
    attributes = resample_attributes(table)
    duration = table[:, 3]
    summary = {
        "source_sessions": int(len(table) + sum(dropped.values())),
        "dropped_rows": dropped,
        "cleaned_sessions": int(len(table)),
        "cleaned_mean": {name: float(table[:, i].mean()) for i, name in enumerate(ATTRIBUTE_COLUMNS)},
        "resampled_rows": int(len(attributes)),
        "resampled_mean": {name: float(attributes[:, i].mean()) for i, name in enumerate(ATTRIBUTE_COLUMNS)},
        "service_time_mean_h": float(duration.mean()),
        "service_time_scv": float(duration.var() / duration.mean() ** 2),
        "profile_days": int(len(dates)),
        "profile_days_dropped": days_dropped,
        "profile_first_day": str(dates[0]),
        "profile_last_day": str(dates[-1]),
        "raw_orders": orders,
        "resample_seed": RESAMPLE_SEED,
    }
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "profiles.npz", dates=dates, power_kw=power)
    np.savez_compressed(out / "ev_attributes.npz", attributes=attributes, columns=np.array(ATTRIBUTE_COLUMNS))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


@entry_point("evjax.data.calibrate")
def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="evjax.data.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="folder with usable_data.xlsx, EV_data1.xlsx, CSs_load.xlsx")
    parser.add_argument("--out", default=str(FIGURES_DIR), help="where to write the figure files")
    args = parser.parse_args(argv)
    summary = calibrate(Path(args.source), Path(args.out))
    print(f"sessions: {summary['source_sessions']} read, {summary['cleaned_sessions']} kept; dropped per rule: "
          f"{summary['dropped_rows']}")
    print(f"station-load days: {summary['profile_days']} kept ({summary['profile_days_dropped']} dropped), "
          f"{summary['profile_first_day']} .. {summary['profile_last_day']}")
    print(f"service time: mean {summary['service_time_mean_h']:.3f} h, SCV {summary['service_time_scv']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
