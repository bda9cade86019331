# Developer tasks. The e2e targets need root (they run a real Slurm cluster on this machine).

.PHONY: e2e e2e-up e2e-down capture

PYTHON ?= python3

# Start the box and run the end-to-end tests against it (as root).
e2e: e2e-up
	CI=true $(PYTHON) -m pytest tests/e2e

# Start the test Slurm cluster ("the box"); idempotent, a few seconds once installed.
e2e-up:
	tests/e2e/box/start.sh

# Stop the box's daemons (by the pids start.sh recorded); data and configuration stay.
e2e-down:
	tests/e2e/box/stop.sh

# Run the capture workload on the box and rewrite tests/data/sacct-box-22.05.* and
# examples/sacct-sample.txt (about two minutes; see tests/data/README.md).
capture: e2e-up
	tests/e2e/capture.sh
