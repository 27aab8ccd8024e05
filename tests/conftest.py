import os
import sys

# Idle OpenMP workers sleep instead of spinning: on a 2-core machine spinning workers of
# torch (and of the subprocesses the training tests start) starve each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, os.path.dirname(__file__))
