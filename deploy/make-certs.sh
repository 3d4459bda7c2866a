#!/bin/sh
# Makes a local CA and a certificate per NATS node, for TLS on client connections and
# mutual TLS on routes (a node joins the cluster only with a certificate of this CA).
#
#   deploy/make-certs.sh [DIR] [NODE ...]     # default: deploy/certs nats-1 nats-2 nats-3
#
# Writes DIR/ca.pem, DIR/ca-key.pem (keep it offline once the nodes have theirs) and
# DIR/<node>.pem, DIR/<node>-key.pem, valid for the node's name, localhost and 127.0.0.1.
# An existing CA is kept, so running it again with a new node name adds that node.
set -eu
dir=${1:-$(dirname "$0")/certs}
[ $# -gt 0 ] && shift
[ $# -gt 0 ] || set -- nats-1 nats-2 nats-3
mkdir -p "$dir"
umask 077
if [ ! -f "$dir/ca.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=wgmfa NATS CA" -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" 2>/dev/null
fi
for node in "$@"; do
  ext=$(mktemp)
  printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth,clientAuth" \
    "subjectAltName=DNS:$node,DNS:localhost,IP:127.0.0.1" > "$ext"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$node" \
    -keyout "$dir/$node-key.pem" -out "$dir/$node.csr" 2>/dev/null
  openssl x509 -req -in "$dir/$node.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" -CAcreateserial \
    -days 825 -extfile "$ext" -out "$dir/$node.pem" 2>/dev/null
  rm -f "$dir/$node.csr" "$ext"
done
# the CA certificate is public: every client needs it (WGMFA_NATS_CA_FILE)
chmod 644 "$dir/ca.pem"
echo "certificates in $dir: ca.pem and $*"
