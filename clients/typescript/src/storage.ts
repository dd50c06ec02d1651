// Where the client keeps the highest sequence number it has applied, so that a reloaded
// page asks fanout for what it missed instead of starting over. Anything with the three
// methods of the Web Storage API will do: `localStorage` in a browser (the default),
// `memoryStorage()` in Node or in tests, or an adapter over the application's own store.

/** The part of the Web Storage API the client uses (`localStorage` and `sessionStorage` are ones). */
export interface SeqStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/** A storage that lives as long as the object: share one between clients to stand for one browser. */
export function memoryStorage(): SeqStorage {
  const items = new Map<string, string>();
  return {
    getItem: (key) => items.get(key) ?? null,
    setItem: (key, value) => void items.set(key, String(value)),
    removeItem: (key) => void items.delete(key),
  };
}

/** `localStorage` when there is a usable one (a browser; not a sandboxed frame, not Node), else `null`. */
export function defaultStorage(): SeqStorage | null {
  try {
    const storage = (globalThis as { localStorage?: SeqStorage }).localStorage;
    if (!storage) return null;
    storage.getItem("fanout:probe");
    return storage;
  } catch {
    return null;
  }
}

/** The stored sequence number under `key`, or `null` (none, unreadable, or not a number). */
export function loadSeq(storage: SeqStorage | null, key: string): number | null {
  try {
    const text = storage?.getItem(key);
    if (text === null || text === undefined || !/^\d+$/.test(text)) return null;
    const seq = Number(text);
    return Number.isSafeInteger(seq) ? seq : null;
  } catch {
    return null;
  }
}

/** Stores `seq` under `key` (`null`: none); a full or refused storage only costs the next reload a refetch. */
export function saveSeq(storage: SeqStorage | null, key: string, seq: number | null): void {
  try {
    if (seq === null) storage?.removeItem(key);
    else storage?.setItem(key, String(seq));
  } catch {
    // Quota or privacy mode: the in-memory position still serves reconnections.
  }
}
