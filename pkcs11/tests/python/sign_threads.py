"""Signs from several threads at once through a PKCS#11 module with python-pkcs11.

Usage: sign_threads.py MODULE TOKEN_LABEL KEY_LABEL THREADS PER_THREAD

Each thread opens its own session, finds the private key by label, waits for the others
(so that all of them sign at the same time), then signs PER_THREAD messages of its own
with CKM_ECDSA_SHA256. Prints one JSON line: the uncompressed public point (from the
public-key object's CKA_EC_POINT), every message with its signature (r || s, hex), and
every error.
"""

import json
import sys
import threading

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass


def main():
    module, token_label, key_label = sys.argv[1], sys.argv[2], sys.argv[3]
    threads, per_thread = int(sys.argv[4]), int(sys.argv[5])
    lib = pkcs11.lib(module)
    token = lib.get_token(token_label=token_label)
    lock = threading.Lock()
    start = threading.Barrier(threads)
    signatures, errors = [], []

    def work(i):
        try:
            with token.open() as session:
                key = session.get_key(
                    object_class=ObjectClass.PRIVATE_KEY,
                    key_type=KeyType.EC,
                    label=key_label,
                )
                start.wait(timeout=120)
                for j in range(per_thread):
                    message = f"thread {i} message {j}".encode()
                    signature = key.sign(message, mechanism=Mechanism.ECDSA_SHA256)
                    with lock:
                        signatures.append(
                            {"message": message.hex(), "signature": signature.hex()}
                        )
        except Exception as e:  # reported, and the Rust side fails on any
            with lock:
                errors.append(f"thread {i}: {e!r}")

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()

    with token.open() as session:
        public = session.get_key(
            object_class=ObjectClass.PUBLIC_KEY, key_type=KeyType.EC, label=key_label
        )
        ec_point = bytes(public[Attribute.EC_POINT])
    print(
        json.dumps(
            {"ec_point": ec_point.hex(), "signatures": signatures, "errors": errors}
        )
    )


if __name__ == "__main__":
    main()
