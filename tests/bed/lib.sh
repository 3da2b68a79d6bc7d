# Shared paths and helpers of the test bed scripts. Sourced, never run.
# shellcheck shell=bash

BED_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BED_DIR/../.." && pwd)
# shellcheck source=versions.env
. "$BED_DIR/versions.env"

# Everything expensive lives outside the clone, keyed by version, so warm runs skip it.
BLINK_CACHE=${BLINK_CACHE:-$HOME/.cache/blink}
K8S_BIN="$BLINK_CACHE/kubernetes-$KUBERNETES_VERSION"
ETCD_BIN="$BLINK_CACHE/etcd-$ETCD_VERSION"
KWOK_BIN="$BLINK_CACHE/kwok-$KWOK_VERSION"
KAFKA_HOME="$BLINK_CACHE/kafka-$KAFKA_VERSION"

# One test bed per machine: its network namespace and its run directory.
BLINK_NETNS=${BLINK_NETNS:-blink-bed}
BLINK_RUN=${BLINK_RUN:-/run/blink-bed}

die() {
	echo "blink-bed: $*" >&2
	exit 1
}

log() {
	echo "blink-bed: $*" >&2
}

need_cmd() {
	local cmd
	for cmd in "$@"; do
		command -v "$cmd" >/dev/null 2>&1 || die "missing tool: $cmd (run tests/bed/install first)"
	done
}

# Fails with one clear line when a TCP port is already listening in this namespace.
port_free() {
	local port=$1 what=$2 holder
	holder=$(ss -Htlnp "sport = :$port" 2>/dev/null | head -n1)
	[ -z "$holder" ] || die "port $port (for $what) is already taken: $holder"
}

# Issues an X.509 v3 certificate (rustls refuses v1) signed by the bed's CA in DIR:
# DIR/NAME.crt and DIR/NAME.key. USAGE is serverAuth or clientAuth.
issue_cert() { # dir name subject usage [subjectAltName]
	local dir=$1 name=$2 subj=$3 usage=$4 san=${5:-}
	local ext=(-addext "basicConstraints=critical,CA:FALSE"
		-addext "keyUsage=critical,digitalSignature,keyEncipherment"
		-addext "extendedKeyUsage=$usage")
	[ -z "$san" ] || ext+=(-addext "subjectAltName=$san")
	openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
		-keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "$subj" "${ext[@]}" 2>/dev/null
	openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
		-CAcreateserial -days 30 -copy_extensions copy -out "$dir/$name.crt" 2>/dev/null
	rm -f "$dir/$name.csr"
}
