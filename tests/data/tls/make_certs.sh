#!/usr/bin/env bash
# Makes the test certificates in this directory (run from here; they are
# committed, valid until 2126, for tests only -- never use these keys elsewhere):
#   ca.pem                       the CA the server trusts for clients (and that signs the server's)
#   server.pem, server_key.pem   the server's certificate (127.0.0.1, localhost), signed by ca
#   client.pem, client_key.pem   a client certificate signed by ca
#   other_ca.pem                 an unrelated CA
#   stranger.pem, stranger_key.pem  a client certificate signed by other_ca
# The same commands, with real names and shorter validity, are in README.md.
set -euo pipefail
DAYS=36500
openssl req -x509 -newkey rsa:2048 -nodes -days $DAYS -subj "/CN=refstorage test CA" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -keyout ca_key.pem -out ca.pem
openssl req -x509 -newkey rsa:2048 -nodes -days $DAYS -subj "/CN=refstorage other CA" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -keyout other_ca_key.pem -out other_ca.pem
sign() {  # name CN ca extfile-lines
    local name=$1 cn=$2 ca=$3 ext=$4
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$cn" -keyout "${name}_key.pem" -out "$name.csr"
    printf '%b\n' "$ext" > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA "$ca.pem" -CAkey "${ca}_key.pem" -CAcreateserial \
        -days $DAYS -extfile "$name.ext" -out "$name.pem"
    rm -f "$name.csr" "$name.ext"
}
sign server 127.0.0.1 ca "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nauthorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash"
sign client app-client ca "extendedKeyUsage=clientAuth\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nauthorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash"
sign stranger stranger other_ca "extendedKeyUsage=clientAuth\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nauthorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash"
rm -f ca_key.pem other_ca_key.pem ./*.srl
