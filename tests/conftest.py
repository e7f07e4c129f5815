"""Shared test setup: no progress bars, few threads (the machine has 2 cores shared by everything)."""

import os

os.environ.setdefault("DYNRES_NO_PROGRESS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
