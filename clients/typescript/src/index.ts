// fanout for dashboards: the wire contract as types, the REST API, and the client that
// resumes, resyncs and refreshes (README.md).

export * from "./protocol.js";
export { createFanoutClient } from "./client.js";
export type { FanoutClient, FanoutClientOptions, FanoutStatus, RefetchContext, RefetchReason } from "./client.js";
export { createRest, FanoutRestError } from "./rest.js";
export type { FanoutRest, RestOptions } from "./rest.js";
export { memoryStorage } from "./storage.js";
export type { SeqStorage } from "./storage.js";
export { readClaims } from "./token.js";
export type { TokenClaims } from "./token.js";
