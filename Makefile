# The two commands a newcomer needs (README.md), and one to stop.
.PHONY: run test stop

# Run Blink: the test bed, the scaler, an activator and a sample function at zero, in
# the foreground (Ctrl-C stops it); it prints the command that wakes the function.
run:
	@tests/bed/install
	@tests/bed/bed start
	@tests/bed/run-blink

# Run every check and test, against real servers.
test:
	@tests/run

stop:
	@tests/bed/bed stop
