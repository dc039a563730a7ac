// Shared by the Node clients: one JSON line on stdout for the Rust test to read, and an
// OAuth error response (RFC 6749 §5.2) as data rather than a crash.
import * as client from 'openid-client';

/** Prints `value` as the script's single line of output. */
export function emit(value) {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

/**
 * Runs `step`; an error response from the server becomes `{ refused: {...} }` with the
 * HTTP status and the RFC 6749 §5.2 members. Anything else (TLS, network, a response the
 * library rejects) propagates and fails the script.
 */
export async function outcome(step) {
  try {
    return { ok: await step() };
  } catch (e) {
    if (e instanceof client.ResponseBodyError) {
      return {
        refused: {
          status: e.status,
          error: e.error,
          error_description: e.error_description ?? null,
        },
      };
    }
    throw e;
  }
}

/** Ends the script with the error on stderr and a non-zero status. */
export function fail(e) {
  process.stderr.write(`${e?.stack ?? e}\n`);
  if (e?.cause !== undefined) {
    process.stderr.write(`cause: ${JSON.stringify(e.cause)}\n`);
  }
  process.exit(1);
}
