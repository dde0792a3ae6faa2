"""Real-data calibration (``calibrate``) and scenario sampling (``scenarios``)."""
