// What the client reads in a JWT without verifying it: when it expires (to refresh it
// before), and whose it is (to key the stored lastSeq). fanout verifies; nothing here is
// trusted for anything else.

/** The claims the client uses; any of them may be missing from a token it cannot read. */
export interface TokenClaims {
  exp?: number;
  organizationId?: string | number;
  userId?: string | number;
}

/** The claims of `token` (a leading `Bearer ` ignored), or `{}` when it is not a readable JWT. */
export function readClaims(token: string): TokenClaims {
  const payload = token.replace(/^Bearer\s+/i, "").split(".")[1];
  if (!payload) return {};
  try {
    const claims: unknown = JSON.parse(base64UrlDecode(payload));
    if (typeof claims !== "object" || claims === null) return {};
    const { exp, organizationId, userId } = claims as Record<string, unknown>;
    return {
      exp: typeof exp === "number" && Number.isFinite(exp) ? exp : undefined,
      organizationId: isId(organizationId) ? organizationId : undefined,
      userId: isId(userId) ? userId : undefined,
    };
  } catch {
    return {};
  }
}

const isId = (value: unknown): value is string | number => typeof value === "string" || typeof value === "number";

/** base64url → UTF-8 text, in browsers and Node alike (atob and TextDecoder are in both). */
function base64UrlDecode(text: string): string {
  const base64 = text.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(text.length / 4) * 4, "=");
  const binary = atob(base64);
  const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
}
