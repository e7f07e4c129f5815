"""How many scans to read: the ``ScanPolicy`` protocol (``scans``), the per-image SSIM of every scan prefix
(``quality``) and the calibrated thresholds built on it (``calibration``)."""
