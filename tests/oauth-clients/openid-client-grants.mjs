// An agent getting Quorate tokens with openid-client, as an application would:
//
// 1. discovery from the issuer (OpenID Connect Discovery 1.0 §4);
// 2. the jwt-bearer grant (RFC 7523 §2.1: the agent's attestation as `assertion`, RFC 8707
//    `resource` as audience) with a DPoP proof (RFC 9449 §5) by a key pair the library
//    made (`randomDPoPKeyPair`);
// 3. with --actor-assertion: token exchange (RFC 8693 §2.1) of that DPoP-bound token for
//    a sub-agent whose attestation is the `actor_token`, proving possession of the same
//    key.
//
// The server is trusted through NODE_EXTRA_CA_CERTS (the cluster CA). Prints one JSON
// line: the discovered endpoints, the DPoP public key and its RFC 7638 thumbprint (by
// jose), and for each grant either `ok` (the response as the library returns it, its
// `token_type` as sent on the wire, the token's claims) or `refused` (the error
// response). Exits non-zero only if something other than an error response went wrong.
import { parseArgs } from 'node:util';

import * as client from 'openid-client';
import { calculateJwkThumbprint, decodeJwt, exportJWK } from 'jose';

import { emit, fail, outcome } from './common.mjs';

const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const ACCESS_TOKEN = 'urn:ietf:params:oauth:token-type:access_token';
const JWT = 'urn:ietf:params:oauth:token-type:jwt';

const { values: args } = parseArgs({
  strict: true,
  options: {
    issuer: { type: 'string' },
    assertion: { type: 'string' },
    resource: { type: 'string' },
    scope: { type: 'string' },
    'actor-assertion': { type: 'string' },
    'exchange-scope': { type: 'string' },
    // The grants need no client authentication (the assertion is the credential), but
    // openid-client's `None` method still sends a client_id (RFC 6749 §3.2.1).
    'client-id': { type: 'string', default: 'quorate-test-agent' },
  },
});
for (const required of ['issuer', 'assertion', 'resource']) {
  if (!args[required]) fail(new Error(`--${required} is required`));
}

// The library lower-cases `token_type` (RFC 6749 §7.1: case-insensitive); the fetch hook
// keeps what the server actually sent, to hold it to RFC 9449 §5's "DPoP".
const sent = new Map();
async function recordingFetch(url, options) {
  const response = await fetch(url, options);
  if (options.method === 'POST') {
    try {
      const body = await response.clone().json();
      if (typeof body.access_token === 'string') {
        sent.set(body.access_token, body.token_type);
      }
    } catch {
      // Not JSON: the library reports it.
    }
  }
  return response;
}

async function main() {
  const config = await client.discovery(
    new URL(args.issuer),
    args['client-id'],
    undefined,
    client.None(),
    { [client.customFetch]: recordingFetch },
  );
  const server = config.serverMetadata();

  const keyPair = await client.randomDPoPKeyPair('ES256');
  const dpop = client.getDPoPHandle(config, keyPair);
  const publicJwk = await exportJWK(keyPair.publicKey);
  const jkt = await calculateJwkThumbprint(publicJwk, 'sha256');

  const describe = (tokens) => ({
    access_token: tokens.access_token,
    token_type: tokens.token_type,
    token_type_on_wire: sent.get(tokens.access_token) ?? null,
    expires_in: tokens.expires_in ?? null,
    scope: tokens.scope ?? null,
    issued_token_type: tokens.issued_token_type ?? null,
    claims: decodeJwt(tokens.access_token),
  });

  const bearerParams = { assertion: args.assertion, resource: args.resource };
  if (args.scope) bearerParams.scope = args.scope;
  const jwtBearer = await outcome(async () =>
    describe(await client.genericGrantRequest(config, JWT_BEARER, bearerParams, { DPoP: dpop })),
  );

  let exchange = null;
  if (args['actor-assertion'] && jwtBearer.ok) {
    const exchangeParams = {
      subject_token: jwtBearer.ok.access_token,
      subject_token_type: ACCESS_TOKEN,
      actor_token: args['actor-assertion'],
      actor_token_type: JWT,
      requested_token_type: ACCESS_TOKEN,
    };
    if (args['exchange-scope']) exchangeParams.scope = args['exchange-scope'];
    exchange = await outcome(async () =>
      describe(
        await client.genericGrantRequest(config, TOKEN_EXCHANGE, exchangeParams, { DPoP: dpop }),
      ),
    );
  }

  emit({
    issuer: server.issuer,
    token_endpoint: server.token_endpoint,
    grant_types_supported: server.grant_types_supported ?? null,
    dpop_signing_alg_values_supported: server.dpop_signing_alg_values_supported ?? null,
    dpop_jwk: publicJwk,
    dpop_jkt: jkt,
    jwt_bearer: jwtBearer,
    exchange,
  });
}

main().catch(fail);
