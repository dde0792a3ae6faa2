"""Real-data calibration (``calibrate``) and scenario sampling (``scenarios``).

The constants both modules share, and the config's check of
``demand.figures_dir``, live here: the figure files ``calibrate`` writes and
``scenarios`` reads.
"""

from pathlib import Path

FIGURES_DIR = Path(__file__).resolve().parent / "figures"  # the figures shipped with evjax
FIGURE_FILES = ("profiles.npz", "ev_attributes.npz", "summary.json")  # what a figures folder holds
ATTRIBUTE_COLUMNS = ("capacity_kwh", "start_soc", "target_soc", "duration_h", "laxity_h")  # ev_attributes.npz columns
