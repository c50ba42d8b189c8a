import assert from "node:assert/strict";
import { NoRespondersError, TimeoutError } from "@nats-io/nats-core";
import {
  ErrorCode,
  fromNatsError,
  isPermanent,
  isServerFault,
  NotFoundError,
  PermanentError,
  toDeadLetterReason,
  toProblem,
  ValidationError,
  WeftError,
} from "./errors.ts";

Deno.test("toProblem() maps each error code to its HTTP status once", () => {
  const cases: [unknown, number][] = [
    [new ValidationError("bad", { code: ErrorCode.MalformedJson }), 400],
    [new ValidationError("/text is required", { field: "/text" }), 422],
    [new WeftError(ErrorCode.PayloadTooLarge, "big"), 413],
    [new WeftError(ErrorCode.UnsupportedMediaType, "xml"), 415],
    [new NotFoundError("no item"), 404],
    [new WeftError(ErrorCode.Unavailable, "down"), 503],
    [new Error("internal detail"), 500],
  ];
  for (const [err, status] of cases) assert.equal(toProblem(err).status, status);
});

Deno.test("toProblem() answers NATS slow or away as 503 unavailable; fromNatsError() adds Retry-After", () => {
  for (const err of [new TimeoutError(), new NoRespondersError("weft.x")]) {
    assert.equal(toProblem(err).status, 503);
    assert.equal(toProblem(err).code, "unavailable");
    const mapped = fromNatsError(err);
    assert.ok(mapped instanceof WeftError);
    assert.equal(mapped.retryAfterSeconds, 5);
    assert.equal(mapped.cause, err);
  }
  const other = new Error("x");
  assert.equal(fromNatsError(other), other);
});

Deno.test("toProblem() names the field and never shows a 5xx error's message", () => {
  const p = toProblem(new ValidationError("/text is required", { field: "/text" }));
  assert.equal(p.field, "/text");
  assert.equal(p.detail, "/text is required");
  assert.equal(p.code, "invalid_field");
  assert.equal(toProblem(new Error("password=hunter2")).detail, "Internal error");
});

Deno.test("isPermanent() is true for bad input and refusals, false for unknown failures", () => {
  assert.equal(isPermanent(new ValidationError("x")), true);
  assert.equal(isPermanent(new PermanentError("policy")), true);
  assert.equal(isPermanent(new Error("timeout")), false);
  assert.equal(isPermanent(new WeftError(ErrorCode.HandlerFailed, "flaky")), false);
});

Deno.test("toDeadLetterReason() keeps the code and names the field", () => {
  assert.deepEqual(
    toDeadLetterReason(
      new ValidationError("/data/text is required", {
        field: "/data/text",
        code: ErrorCode.InvalidEvent,
      }),
    ),
    { code: "invalid_event", reason: "/data/text is required (field /data/text)" },
  );
  assert.equal(toDeadLetterReason(new Error("boom")).code, "handler_failed");
});

Deno.test("isServerFault() is false for a full stream's 507, a refusal by design, and true for a handler's 500", () => {
  assert.equal(
    isServerFault(new WeftError(ErrorCode.InsufficientStorage, "stream X is full")),
    false,
  );
  assert.equal(isServerFault(new Error("boom")), true);
});
