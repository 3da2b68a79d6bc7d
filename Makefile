# The two commands a newcomer needs (README.md), and one to stop.
.PHONY: run test stop

# Run Blink: the test bed with Blink's CRDs installed.
run:
	@tests/bed/install
	@tests/bed/bed start
	@tests/bed/bed kubectl apply --server-side --force-conflicts -f crds/blink.sh_crds.yaml

# Run every check and test, against real servers.
test:
	@tests/run

stop:
	@tests/bed/bed stop
