# The two commands a newcomer needs (README.md), and one to stop.
.PHONY: run test stop

# Run Blink: the test bed, Blink's CRDs, and the scaler in the foreground (Ctrl-C stops it).
run:
	@tests/bed/install
	@tests/bed/bed start
	@tests/bed/run-scaler

# Run every check and test, against real servers.
test:
	@tests/run

stop:
	@tests/bed/bed stop
