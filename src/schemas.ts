/**
 * The event catalog: the JSON Schemas every event and document is validated against, the
 * single source of truth for their shapes (the files live in schemas/). The runtime registers
 * its own documents (dead letters, schedules); each pipeline registers its events and
 * documents with {@link registerEvents} when its events module loads, and adds their
 * TypeScript types to {@link EventMap} and {@link DocumentMap} by declaration merging. Schemas
 * are compiled by ajv, the fastest validator measured here (~43 ns per small event), on first
 * use.
 *
 * @module
 */
import { Ajv, type ErrorObject, type ValidateFunction } from "ajv";
import addFormatsModule from "ajv-formats";
import { ErrorCode, ValidationError } from "./errors.ts";
import deadletter from "../schemas/deadletter.v1.json" with { type: "json" };
import schedule from "../schemas/schedule.v1.json" with { type: "json" };
import type { DeadLetter, Schedule } from "./events.gen.ts";

/** What every event carries around its `data` (src/events.ts). */
export interface EventEnvelope {
  /** The event's id; derived events' ids are deterministic. */
  id: string;
  /** `<pipeline>.<event>`. */
  type: string;
  /** The schema version of `type`. */
  version: number;
  /** The item the event is about. */
  item_id: string;
  /** The item's trace id. */
  trace_id: string;
  /** When it happened (RFC 3339). */
  time: string;
  /** The producing service. */
  source: string;
  /** The payload. */
  data: unknown;
}

/**
 * Every registered event type with its payload type, keyed by `type`. Empty in the runtime:
 * each pipeline's events module adds its own by declaration merging, e.g.
 *
 * ```ts ignore
 * declare module "../../src/schemas.ts" {
 *   interface EventMap { "orders.placed": OrdersPlaced }
 * }
 * ```
 */
// deno-lint-ignore no-empty-interface
export interface EventMap {}
/** Any registered event (the envelope alone while no pipeline has added its events). */
export type AnyEvent = [keyof EventMap] extends [never] ? EventEnvelope : EventMap[keyof EventMap];

/** Documents that are not events but have schemas too; pipelines add theirs like events. */
export interface DocumentMap {
  /** A message a stage gave up on, kept in the DEADLETTER stream. */
  "deadletter": DeadLetter;
  /** A schedule: the body of POST /schedules. */
  "schedule": Schedule;
}

/** What a pipeline's events module registers with {@link registerEvents}. */
export interface EventCatalog {
  /** Schemas the others `$ref` by file name, keyed by name (e.g. `defs` for defs.v1.json). */
  shared?: Readonly<Record<string, object>>;
  /** Event schemas by type; each names its version in `properties.version.const`. */
  events?: Readonly<Record<string, object>>;
  /** Document schemas by name (submissions, states...). */
  documents?: Readonly<Record<string, object>>;
  /**
   * The event types that start an item. One is published with "expected last subject
   * sequence 0", so the stream stores one per item however late a re-sent submission comes,
   * and the first step handles only the first one stored on its subject (or a byte for byte
   * redrive of it): a forged or repeated entry event never runs an item again.
   */
  entry?: readonly string[];
  /**
   * Subjects plain-JSON submissions arrive on over the bus (`nats pub orders.submit ...`),
   * with the document each is validated as: a redrive of one is checked the same way and
   * keeps the item id its intake gave it.
   */
  submissions?: Readonly<Record<string, string>>;
  /**
   * Subjects plain-JSON requests that are no item arrive on (e.g. `digest.request.<pipeline>`), with
   * the document each is validated as: a redrive of one is checked the same way (not as an
   * event, whatever its subject looks like) and republished as it was.
   */
  requests?: Readonly<Record<string, string>>;
}

// ajv-formats is CommonJS; its default export arrives wrapped under Deno's npm interop.
const addFormats = ((addFormatsModule as unknown as { default?: unknown }).default ??
  addFormatsModule) as (ajv: Ajv) => Ajv;

// Schemas are not checked against the JSON Schema meta-schema as they are registered: that
// compiled the meta-schema in every process at start (86 ms a process, measured in the
// supervisor's CPU profile), for schemas that do not change at run time. Strict mode still
// refuses a bad schema when it compiles, and src/schemas_test.ts checks every registered one
// against the meta-schema.
const ajv = new Ajv({
  allErrors: false,
  strict: true,
  allowUnionTypes: true,
  validateSchema: false,
});
addFormats(ajv);

const schemaDocuments = new Map<string, object>();
const documentSchemas = new Map<string, object>();
/**
 * Validators are compiled on first use, not at registration: a service compiles only the
 * schemas of the events and documents it handles (each compiled schema costs heap and
 * start-up time).
 */
const eventVersions = new Map<string, Map<number, object>>();
const entryTypes = new Set<string>();
const eventRoots = new Set<string>();
const submissionSubjects = new Map<string, string>();
const requestSubjects = new Map<string, string>();

/** A schema's `$id`, what tells two schemas apart. */
const idOf = (schema: object): string | undefined => (schema as { $id?: string }).$id;

/** Adds a schema to ajv by its `$id` (once), so others can `$ref` it. */
function addSchema(name: string, schema: object): void {
  const id = (schema as { $id?: string }).$id;
  if (id && !ajv.getSchema(id)) ajv.addSchema(schema);
  schemaDocuments.set(name, schema);
}

/**
 * Registers a pipeline's event and document schemas (idempotent: a module that loads twice
 * registers the same schemas again). Throws a TypeError when an event type's version, or a
 * submission subject, is already registered otherwise: two pipelines cannot own one.
 *
 * @example
 * ```ts ignore
 * import placed from "../../schemas/orders.placed.v1.json" with { type: "json" };
 * registerEvents({ events: { "orders.placed": placed }, entry: ["orders.placed"] });
 * ```
 */
export function registerEvents(catalog: EventCatalog): void {
  for (const [name, schema] of Object.entries(catalog.shared ?? {})) addSchema(name, schema);
  for (const [name, schema] of Object.entries(catalog.documents ?? {})) {
    addSchema(name, schema);
    documentSchemas.set(name, schema);
  }
  for (const [type, schema] of Object.entries(catalog.events ?? {})) {
    const version = (schema as { properties?: { version?: { const?: unknown } } }).properties
      ?.version?.const;
    if (typeof version !== "number") {
      throw new TypeError(`the schema of ${type} names no version (properties.version.const)`);
    }
    let versions = eventVersions.get(type);
    const registered = versions?.get(version);
    if (registered && idOf(registered) !== idOf(schema)) {
      throw new TypeError(
        `${type} version ${version} is already registered with another schema (${
          idOf(registered)
        }): two pipelines cannot own one event type`,
      );
    }
    addSchema(type, schema);
    if (!versions) eventVersions.set(type, versions = new Map());
    versions.set(version, schema);
    eventRoots.add(type.split(".")[0]!);
  }
  for (const type of catalog.entry ?? []) entryTypes.add(type);
  addSubjects(submissionSubjects, catalog.submissions);
  addSubjects(requestSubjects, catalog.requests);
}

/** Adds document subjects to `into`; a subject validated otherwise already is a TypeError. */
function addSubjects(
  into: Map<string, string>,
  subjects: Readonly<Record<string, string>> | undefined,
): void {
  for (const [subject, document] of Object.entries(subjects ?? {})) {
    const taken = submissionSubjects.get(subject) ?? requestSubjects.get(subject);
    if (taken !== undefined && (taken !== document || !into.has(subject))) {
      throw new TypeError(`messages on ${subject} are already validated as ${taken}`);
    }
    into.set(subject, document);
  }
}

registerEvents({ documents: { deadletter, schedule } });

/**
 * Every registered schema document by name (`deadletter`, `defs`, `orders.submit`...): the
 * event and document schemas and the shared definitions, e.g. for the gateway's OpenAPI
 * description.
 */
export function registeredSchemas(): Readonly<Record<string, object>> {
  return Object.fromEntries(schemaDocuments);
}

/** True when `type` starts an item ({@link EventCatalog.entry}). */
export function isEntryEvent(type: string): boolean {
  return entryTypes.has(type);
}

/** True when `root` is the first token of a registered event type (`<root>.<event>`). */
export function isEventRoot(root: string): boolean {
  return eventRoots.has(root);
}

/** The document a bus submission on `subject` is validated as, if it is a submission subject. */
export function submissionDocument(subject: string): keyof DocumentMap | undefined {
  return submissionSubjects.get(subject) as keyof DocumentMap | undefined;
}

/**
 * The document a request that is no item on `subject` is validated as
 * ({@link EventCatalog.requests}), if it is a request subject.
 */
export function requestDocument(subject: string): keyof DocumentMap | undefined {
  return requestSubjects.get(subject) as keyof DocumentMap | undefined;
}

const compiled = new Map<object, ValidateFunction>();
function validatorOf(schema: object): ValidateFunction {
  let v = compiled.get(schema);
  if (!v) {
    v = ajv.getSchema((schema as { $id: string }).$id) ?? ajv.compile(schema);
    compiled.set(schema, v);
  }
  return v;
}

/** The event types registered, with the schema versions accepted. */
export function knownEventTypes(): Record<string, number[]> {
  return Object.fromEntries(
    [...eventVersions].map(([type, versions]) => [type, [...versions.keys()]]),
  );
}

/** Turns ajv's first error into a message and a JSON pointer naming the field. */
function describe(errors: ErrorObject[] | null | undefined, prefix = ""): {
  field: string;
  message: string;
} {
  const e = errors?.[0];
  if (!e) return { field: prefix || "/", message: "is invalid" };
  let field = prefix + e.instancePath;
  if (e.keyword === "required") {
    field += `/${(e.params as { missingProperty: string }).missingProperty}`;
  }
  if (e.keyword === "additionalProperties") {
    field += `/${(e.params as { additionalProperty: string }).additionalProperty}`;
    return { field, message: `${field} is not an allowed field` };
  }
  if (e.keyword === "required") return { field, message: `${field} is required` };
  return {
    field: field || "/",
    message: `${field || "the document"} ${e.message ?? "is invalid"}`,
  };
}

/**
 * Validates a document (a submission, a ruleset...) against its schema and returns it typed.
 * Throws a {@link ValidationError} whose `field` is a JSON pointer to the first bad field.
 *
 * @example
 * ```ts
 * import { validateDocument } from "./schemas.ts";
 * const schedule = validateDocument("schedule", {
 *   id: "nightly",
 *   subject: "digest.request.nightly",
 *   cron: "0 2 * * *",
 *   payload: {},
 * });
 * console.assert(schedule.id === "nightly");
 * ```
 */
export function validateDocument<K extends keyof DocumentMap>(
  name: K,
  value: unknown,
): DocumentMap[K] {
  const schema = documentSchemas.get(name);
  if (!schema) {
    // A bug, not bad input: the module that registers the document was not loaded.
    throw new Error(`no schema is registered for the document ${name}`);
  }
  const validate = validatorOf(schema);
  if (validate(value)) return value as DocumentMap[K];
  const { field, message } = describe(validate.errors);
  throw new ValidationError(message, { field });
}

/**
 * Validates an event of the expected type(s) from the bus. Unknown fields are ignored.
 * Throws a {@link ValidationError} with code `invalid_event` or `unknown_version`.
 */
export function validateEvent<K extends keyof EventMap>(
  value: unknown,
  expected: readonly K[],
): EventMap[K] {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new ValidationError("event is not a JSON object", {
      code: ErrorCode.InvalidEvent,
      field: "/",
    });
  }
  const { type, version } = value as { type?: unknown; version?: unknown };
  if (typeof type !== "string" || !(expected as readonly string[]).includes(type)) {
    throw new ValidationError(
      `/type must be one of ${expected.join(", ")} (got ${JSON.stringify(type)})`,
      { code: ErrorCode.InvalidEvent, field: "/type" },
    );
  }
  const schema = eventVersions.get(type)?.get(version as number);
  if (!schema) {
    throw new ValidationError(
      `${type} version ${JSON.stringify(version)} is unknown here (known: ${
        [...(eventVersions.get(type)?.keys() ?? [])].join(", ")
      })`,
      { code: ErrorCode.UnknownVersion, field: "/version" },
    );
  }
  const validate = validatorOf(schema);
  if (validate(value)) return value as EventMap[K];
  const { field, message } = describe(validate.errors);
  throw new ValidationError(message, { code: ErrorCode.InvalidEvent, field });
}
