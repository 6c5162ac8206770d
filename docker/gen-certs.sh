#!/usr/bin/env bash
# Makes what a worker needs to serve over TLS with a token, for a test or a first
# deployment (use your own CA in production):
#   ca.pem               the CA clients trust (PYTORCH2JAX_TLS_CA)
#   server.pem/.key      the worker's certificate and key (--tls-cert/--tls-key), valid
#                        for localhost, 127.0.0.1, ::1, "worker" and the names given
#   client.pem/.key      a client certificate, for --tls-client-ca ca.pem (optional)
#   token                a random bearer token (--token-file; PYTORCH2JAX_TOKEN)
# Usage: docker/gen-certs.sh OUT_DIR [HOST_NAME ...]
set -euo pipefail
out="${1:?usage: gen-certs.sh OUT_DIR [HOST_NAME ...]}"
shift
mkdir -p "$out"
cd "$out"
umask 077

san="DNS:localhost,DNS:worker,IP:127.0.0.1,IP:::1"
for name in "$@"; do san="$san,DNS:$name"; done

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
    -subj "/CN=pytorch2jax test CA" -keyout ca.key -out ca.pem 2>/dev/null
for who in server client; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/CN=pytorch2jax $who" -keyout "$who.key" -out "$who.csr" 2>/dev/null
    if [ "$who" = server ]; then
        ext="subjectAltName=$san
extendedKeyUsage=serverAuth"
    else
        ext="extendedKeyUsage=clientAuth"
    fi
    openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
        -extfile <(printf '%s\n' "$ext") -out "$who.pem" 2>/dev/null
    rm "$who.csr"
done
rm -f ca.srl
openssl rand -hex 32 >token
chmod 644 ca.pem server.pem client.pem
echo "wrote ca.pem, server.pem/.key, client.pem/.key and token to $out"
