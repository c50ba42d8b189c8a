import assert from "node:assert/strict";
import { newScheduleEntry } from "./store.ts";
import { ValidationError } from "../errors.ts";

Deno.test("an `at` the schema takes but Date cannot hold (a leap second) is refused naming /at, not a 500", () => {
  const now = new Date("2030-01-01T00:00:00Z");
  assert.throws(
    () =>
      newScheduleEntry(
        { subject: "orders.submit", payload: {}, at: "2030-06-30T23:59:60Z" },
        now,
      ),
    (err: unknown) => err instanceof ValidationError && err.field === "/at",
  );
  const ok = newScheduleEntry(
    { subject: "orders.submit", payload: {}, at: "2030-06-30T23:59:59Z" },
    now,
  );
  assert.equal(ok.next_at, "2030-06-30T23:59:59.000Z");
});
