"""A CI bot getting a Quorate token with Authlib, as a Python service would.

OpenID discovery from the issuer and the JWKS (requests), then the client_credentials
grant (RFC 6749 §4.4) through Authlib's ``OAuth2Session``, the client authenticated with
``private_key_jwt`` (RFC 7523 §2.2, OpenID Connect Core §9): Authlib's ``PrivateKeyJWT``
signs the ``client_assertion`` ES256 with the client's key (iss = sub = client_id, aud =
the token endpoint, a jti), and the RFC 8707 ``resource`` names the audience.

The server is trusted through ``--ca`` (the cluster CA) passed as ``verify`` to every
request. Prints one JSON line: the discovery facts, the JWKS key ids, and ``ok`` (the token
response) or ``refused`` (HTTP status and the RFC 6749 §5.2 members). Exits non-zero only
if something other than an error response went wrong.
"""

import argparse
import json
import sys
import time

import requests
from authlib.integrations.base_client import OAuthError
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from joserfc.jwk import ECKey

TIMEOUT_SECONDS = 30


def get_json(url, ca):
    response = requests.get(url, verify=ca, timeout=TIMEOUT_SECONDS)
    if response.status_code != 200:
        raise RuntimeError(f"GET {url}: HTTP {response.status_code}: {response.text}")
    return response.json()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--key", required=True, help="the client's P-256 private key (PEM)")
    parser.add_argument("--kid", required=True, help="its key id in the registered JWKS")
    parser.add_argument("--resource", required=True)
    parser.add_argument("--scope")
    parser.add_argument("--ca", required=True, help="CA certificate (PEM) to trust")
    parser.add_argument(
        "--assertion-lifetime",
        type=int,
        default=120,
        help="seconds until the client assertion's exp (Authlib's default is 3600)",
    )
    args = parser.parse_args()

    base = args.issuer.rstrip("/")
    metadata = get_json(f"{base}/.well-known/openid-configuration", args.ca)
    jwks = get_json(metadata["jwks_uri"], args.ca)
    token_endpoint = metadata["token_endpoint"]

    with open(args.key, "rb") as f:
        key = ECKey.import_key(f.read())

    # The HTTP status of the token response, which Authlib's error does not carry.
    statuses = []

    def record_status(response):
        statuses.append(response.status_code)
        return response

    session = OAuth2Session(
        client_id=args.client_id,
        client_secret=key,
        token_endpoint_auth_method="private_key_jwt",
    )
    # Authlib signs assertions valid for an hour unless told otherwise; the claim given
    # here replaces its exp (the assertion is made for this one request).
    session.register_client_auth_method(
        PrivateKeyJWT(
            token_endpoint,
            claims={"exp": int(time.time()) + args.assertion_lifetime},
            headers={"kid": args.kid},
            alg="ES256",
        )
    )
    session.register_compliance_hook("access_token_response", record_status)

    params = {"resource": args.resource}
    if args.scope:
        params["scope"] = args.scope
    try:
        token = session.fetch_token(
            token_endpoint,
            grant_type="client_credentials",
            verify=args.ca,
            timeout=TIMEOUT_SECONDS,
            **params,
        )
        result = {"ok": dict(token), "status": statuses[-1] if statuses else None}
    except OAuthError as e:
        result = {
            "refused": {
                "status": statuses[-1] if statuses else None,
                "error": e.error,
                "error_description": e.description,
            }
        }
    except requests.HTTPError as e:
        result = {
            "refused": {
                "status": e.response.status_code,
                "error": None,
                "error_description": e.response.text,
            }
        }

    print(
        json.dumps(
            {
                "issuer": metadata["issuer"],
                "token_endpoint": token_endpoint,
                "grant_types_supported": metadata.get("grant_types_supported"),
                "token_endpoint_auth_methods_supported": metadata.get(
                    "token_endpoint_auth_methods_supported"
                ),
                "jwks_kids": [k.get("kid") for k in jwks.get("keys", [])],
                "token": result,
            }
        )
    )


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - any other failure fails the script
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        raise
