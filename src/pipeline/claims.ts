/**
 * Claims on items waiting for a person: a reviewer takes an item held at one of a
 * definition's `wait` steps, so two people do not work on it at once. A claim lapses after
 * `WEFT_CLAIM_TTL_MS` (another may then take the item); while it is live, only its holder's
 * decision is taken over HTTP and `weft.<name>.*` requests (an awaited event published on
 * the bus, such as an external callback, is not a person's and is not held back).
 *
 * One KV entry per item in `weft_<name>_claims`, written with compare-and-set, so two
 * reviewers claiming at once get one claim and one 409.
 *
 * @module
 */
import type { KV } from "@nats-io/kv";
import { ConflictError } from "../errors.ts";
import { pipelineBucketOf } from "./derive.ts";

/** A live or lapsed claim on an item. */
export interface Claim {
  /** Who holds it: the API key's holder, or (auth off) the name given. */
  by: string;
  /** When it was taken (ISO). */
  at: string;
  /** When it lapses (ISO). */
  until: string;
}

/** The KV bucket of a pipeline's claims. */
export function claimsBucketOf(name: string): string {
  return pipelineBucketOf(name, "claims");
}

/** Whether `claim` is held by someone other than `who` at `now`. */
export function heldByAnother(claim: Claim | null, who: string, now: Date): boolean {
  return claim !== null && claim.by !== who && Date.parse(claim.until) > now.getTime();
}

/** Claims of one pipeline's items. */
export interface Claims {
  /** The item's claim, live or lapsed; null when none. */
  get(item: string): Promise<Claim | null>;
  /**
   * Takes (or, for its holder, renews) the item's claim: a {@link ConflictError} while
   * another holds a live one.
   */
  take(item: string, who: string): Promise<Claim>;
  /** Gives the claim up: false when `who` held none; a {@link ConflictError} for another's. */
  release(item: string, who: string): Promise<boolean>;
  /** Refuses (409) a decision by `who` while another holds a live claim on the item. */
  assertMayDecide(item: string, who: string): Promise<void>;
}

const encoder = new TextEncoder();

/**
 * The claims kept in `kv`, each lasting `ttlMs`.
 *
 * @example
 * ```ts ignore
 * const claims = createClaims(await new Kvm(nc).open(claimsBucketOf("tickets")), 900_000);
 * await claims.take("t1", "carol");
 * await claims.assertMayDecide("t1", "dave"); // ConflictError: claimed by carol until ...
 * ```
 */
export function createClaims(
  kv: KV,
  ttlMs: number,
  now: () => Date = () => new Date(),
): Claims {
  const read = async (item: string) => {
    const e = await kv.get(item);
    if (!e || e.operation !== "PUT" || e.length === 0) {
      return { claim: null, revision: e?.revision };
    }
    return { claim: e.json<Claim>(), revision: e.revision };
  };
  const conflict = (item: string, c: Claim) =>
    new ConflictError(`item ${item} is claimed by ${c.by} until ${c.until}`);
  return {
    async get(item) {
      return (await read(item)).claim;
    },
    async take(item, who) {
      for (let attempt = 0; attempt < 5; attempt++) {
        const { claim, revision } = await read(item);
        const t = now();
        if (heldByAnother(claim, who, t)) throw conflict(item, claim!);
        const next: Claim = {
          by: who,
          at: claim?.by === who && Date.parse(claim.until) > t.getTime()
            ? claim.at
            : t.toISOString(),
          until: new Date(t.getTime() + ttlMs).toISOString(),
        };
        try {
          const body = encoder.encode(JSON.stringify(next));
          if (revision === undefined) await kv.create(item, body);
          else await kv.update(item, body, revision);
          return next;
        } catch {
          // Another took or changed it meanwhile: read again.
        }
      }
      throw new ConflictError(`the claim on item ${item} kept changing; retry`);
    },
    async release(item, who) {
      const { claim, revision } = await read(item);
      if (claim === null || Date.parse(claim.until) <= now().getTime()) return false;
      if (claim.by !== who) throw conflict(item, claim);
      try {
        await kv.delete(item, { previousSeq: revision });
      } catch {
        return false; // changed meanwhile: it is not this claim any more
      }
      return true;
    },
    async assertMayDecide(item, who) {
      const { claim } = await read(item);
      if (heldByAnother(claim, who, now())) throw conflict(item, claim!);
    },
  };
}
