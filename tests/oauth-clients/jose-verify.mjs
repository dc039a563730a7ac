// A resource server verifying Quorate tokens with jose, finding the keys as verifiers do:
// OpenID discovery from the issuer, then the JWKS at its `jwks_uri` (createRemoteJWKSet).
// Each --token is verified with jwtVerify as RFC 9068 §4 asks (issuer, audience, `typ`
// at+jwt, ES256). Then two tokens that must be refused: the first token with its `sub`
// changed (signature) and the first token checked for another audience.
//
// The server is trusted through NODE_EXTRA_CA_CERTS (the cluster CA). Prints one JSON
// line; a refusal is data (`refused` with jose's error code), anything else fails.
import { parseArgs } from 'node:util';

import { createRemoteJWKSet, decodeProtectedHeader, jwtVerify } from 'jose';

import { emit, fail } from './common.mjs';

const { values: args } = parseArgs({
  strict: true,
  options: {
    issuer: { type: 'string' },
    audience: { type: 'string' },
    token: { type: 'string', multiple: true, default: [] },
  },
});
for (const required of ['issuer', 'audience']) {
  if (!args[required]) fail(new Error(`--${required} is required`));
}

async function getJson(url) {
  const response = await fetch(url);
  if (response.status !== 200) {
    throw new Error(`GET ${url}: HTTP ${response.status}: ${await response.text()}`);
  }
  return response.json();
}

async function verified(jwks, issuer, audience, token) {
  try {
    const { payload, protectedHeader } = await jwtVerify(token, jwks, {
      issuer,
      audience,
      typ: 'at+jwt',
      algorithms: ['ES256'],
    });
    return { ok: { header: protectedHeader, payload } };
  } catch (e) {
    if (typeof e?.code === 'string' && e.code.startsWith('ERR_J')) {
      return { refused: { code: e.code, message: e.message } };
    }
    throw e;
  }
}

/** The token with one claim changed and the original signature kept. */
function tampered(token) {
  const [header, payload, signature] = token.split('.');
  const claims = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8'));
  claims.sub = `${claims.sub}-impostor`;
  const forged = Buffer.from(JSON.stringify(claims), 'utf8').toString('base64url');
  return `${header}.${forged}.${signature}`;
}

async function main() {
  // OpenID Connect Discovery 1.0 §4.1: the issuer without a trailing slash, then the path.
  const base = args.issuer.replace(/\/+$/, '');
  const metadata = await getJson(`${base}/.well-known/openid-configuration`);
  if (metadata.issuer !== args.issuer) {
    throw new Error(`discovery names issuer ${metadata.issuer}, expected ${args.issuer}`);
  }
  const jwks = createRemoteJWKSet(new URL(metadata.jwks_uri));
  await jwks.reload();
  const keys = (jwks.jwks()?.keys ?? []).map(({ kty, crv, alg, use, kid }) => ({
    kty,
    crv,
    alg,
    use,
    kid,
  }));

  const tokens = [];
  for (const token of args.token) {
    tokens.push(await verified(jwks, metadata.issuer, args.audience, token));
  }
  let forged = null;
  let otherAudience = null;
  const [first] = args.token;
  if (first !== undefined) {
    forged = await verified(jwks, metadata.issuer, args.audience, tampered(first));
    otherAudience = await verified(jwks, metadata.issuer, 'https://elsewhere.invalid', first);
  }

  emit({
    issuer: metadata.issuer,
    jwks_uri: metadata.jwks_uri,
    keys,
    kids_used: args.token.map((t) => decodeProtectedHeader(t).kid ?? null),
    tokens,
    tampered: forged,
    other_audience: otherAudience,
  });
}

main().catch(fail);
