"""Shared test configuration."""

import sys
from pathlib import Path

# The repository root on sys.path: tests import devkit (not an installed package).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
