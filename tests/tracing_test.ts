/**
 * Tracing end to end: the mesh as real processes with Deno's built-in OpenTelemetry on,
 * exporting OTLP/HTTP JSON to a real local receiver (Deno.serve); one item's spans must
 * share its trace id and chain gateway -> sentiment -> topics -> dispatch.
 */
import assert from "node:assert/strict";
import { headers } from "@nats-io/nats-core";
import { jetstreamManager } from "@nats-io/jetstream";
import { FEEDBACK_STREAM, SUBMIT_SUBJECT } from "../pipelines/feedback/subjects.ts";
import { startMesh, startServices, submit, waitFinal, WHOLE_MESH } from "./helpers/mesh.ts";
import { parseTraceparent } from "../src/observability/trace.ts";
import { connectClient } from "./helpers/nats.ts";

interface ReceivedSpan {
  service: string;
  traceId: string;
  spanId: string;
  parentSpanId: string;
  name: string;
  kind: number | string;
  /** OTLP status code: 2 is ERROR. */
  status: number | string | undefined;
  attributes: Record<string, unknown>;
}

type OtlpValue = { stringValue?: string; intValue?: string | number; boolValue?: boolean };
type OtlpAttr = { key: string; value: OtlpValue };

function attrs(list: OtlpAttr[] | undefined): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const a of list ?? []) {
    out[a.key] = a.value.stringValue ?? a.value.intValue ?? a.value.boolValue;
  }
  return out;
}

/** A real OTLP/HTTP (JSON) trace receiver on a free loopback port. */
function startReceiver() {
  const spans: ReceivedSpan[] = [];
  const waiters = new Set<() => void>();
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (req) => {
    const path = new URL(req.url).pathname;
    if (req.method === "POST" && path === "/v1/traces") {
      const body = await req.json() as {
        resourceSpans: {
          resource: { attributes: OtlpAttr[] };
          scopeSpans: {
            spans: {
              traceId: string;
              spanId: string;
              parentSpanId: string;
              name: string;
              kind: number;
              status?: { code?: number | string };
              attributes: OtlpAttr[];
            }[];
          }[];
        }[];
      };
      for (const rs of body.resourceSpans) {
        const service = String(attrs(rs.resource.attributes)["service.name"]);
        for (const ss of rs.scopeSpans) {
          for (const s of ss.spans) {
            spans.push({
              service,
              traceId: s.traceId,
              spanId: s.spanId,
              parentSpanId: s.parentSpanId,
              name: s.name,
              kind: s.kind,
              status: s.status?.code,
              attributes: attrs(s.attributes),
            });
          }
        }
      }
      for (const w of waiters) w();
    } else await req.body?.cancel();
    return Response.json({});
  });
  return {
    spans,
    url: `http://127.0.0.1:${server.addr.port}`,
    /** Resolves with the spans of `traceId` once `done` holds for them. */
    waitFor(traceId: string, done: (s: ReceivedSpan[]) => boolean, ms = 20_000) {
      return this.waitForSpans((s) => s.traceId === traceId, done, ms, traceId);
    },
    /** Resolves with the spans `which` picks once `done` holds for them. */
    waitForSpans(
      which: (s: ReceivedSpan) => boolean,
      done: (s: ReceivedSpan[]) => boolean,
      ms = 20_000,
      what = "picked",
    ) {
      return new Promise<ReceivedSpan[]>((resolve, reject) => {
        const check = () => {
          const mine = spans.filter(which);
          if (done(mine)) {
            clearTimeout(timer);
            waiters.delete(check);
            resolve(mine);
          }
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(
            new Error(
              `spans (${what}) did not arrive: ${
                JSON.stringify(spans.filter(which).map((s) => [s.service, s.name]))
              }`,
            ),
          );
        }, ms);
        waiters.add(check);
        check();
      });
    },
    [Symbol.asyncDispose]: () => server.shutdown(),
  };
}

const CONSUMER = 5; // OTLP SpanKind CONSUMER
const SERVER = 2;
const kindIs = (s: ReceivedSpan, n: number, name: string) => s.kind === n || s.kind === name;

/** The gateway's HTTP server span of a request to `path` (a prefix of it). */
function gatewaySpanOf(spans: ReceivedSpan[], path: string): ReceivedSpan | undefined {
  return spans.find((s) =>
    s.service === "weft-gateway" && kindIs(s, SERVER, "SPAN_KIND_SERVER") &&
    String(s.attributes["url.path"] ?? s.attributes["http.target"] ?? s.name).includes(path)
  );
}

function stageSpan(spans: ReceivedSpan[], stage: string): ReceivedSpan {
  const found = spans.filter((s) => s.service === `weft-${stage}` && s.name === `${stage} process`);
  assert.equal(found.length, 1, `one ${stage} span`);
  assert.ok(kindIs(found[0]!, CONSUMER, "SPAN_KIND_CONSUMER"));
  assert.equal(found[0]!.attributes["weft.stage"], stage);
  return found[0]!;
}

Deno.test("one item's spans share its trace id and chain from the HTTP request through every stage", async (t) => {
  await using receiver = startReceiver();
  await using mesh = await startServices({
    ...WHOLE_MESH,
    env: {
      OTEL_DENO: "true",
      OTEL_EXPORTER_OTLP_PROTOCOL: "http/json",
      OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url,
      OTEL_BSP_SCHEDULE_DELAY: "200", // export batches every 200 ms instead of 5 s
    },
  });

  await t.step(
    "HTTP submission: client -> gateway -> sentiment -> topics -> dispatch",
    async () => {
      const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
      const clientSpan = "00f067aa0ba902b7";
      const id = await submit(mesh.gatewayUrl, "the app is lovely but checkout crashes", {
        traceparent: `00-${traceId}-${clientSpan}-01`,
      });
      const state = await waitFinal(mesh.gatewayUrl, id) as { status: string; trace_id?: string };
      assert.equal(state.status, "processed");
      const spans = await receiver.waitFor(
        traceId,
        (s) =>
          ["sentiment", "topics", "dispatch"].every((st) =>
            s.some((x) => x.service === `weft-${st}`)
          ) &&
          s.some((x) => x.service === "weft-gateway" && kindIs(x, SERVER, "SPAN_KIND_SERVER")),
      );
      const gateway = spans.find((s) =>
        s.service === "weft-gateway" && kindIs(s, SERVER, "SPAN_KIND_SERVER")
      )!;
      assert.equal(gateway.parentSpanId, clientSpan, "the gateway continues the client's trace");
      const sentiment = stageSpan(spans, "sentiment");
      const topics = stageSpan(spans, "topics");
      const dispatch = stageSpan(spans, "dispatch");
      assert.equal(sentiment.parentSpanId, gateway.spanId);
      assert.equal(topics.parentSpanId, sentiment.spanId);
      assert.equal(dispatch.parentSpanId, topics.spanId);
      for (const s of [sentiment, topics, dispatch]) assert.equal(s.attributes["weft.item_id"], id);
    },
  );

  await t.step(
    "bus submission: publisher -> ingest -> sentiment -> topics -> dispatch",
    async () => {
      const traceId = "0af7651916cd43dd8448eb211c80319c";
      const publisherSpan = "b7ad6b7169203331";
      const h = headers();
      h.set("traceparent", `00-${traceId}-${publisherSpan}-01`);
      mesh.nc.publish(
        SUBMIT_SUBJECT,
        JSON.stringify({ id: "traced-bus-1", text: "slow support" }),
        {
          headers: h,
        },
      );
      await waitFinal(mesh.gatewayUrl, "traced-bus-1");
      const spans = await receiver.waitFor(
        traceId,
        (s) =>
          ["ingest", "sentiment", "topics", "dispatch"].every((st) =>
            s.some((x) => x.service === `weft-${st}`)
          ),
      );
      const ingest = stageSpan(spans, "ingest");
      assert.equal(ingest.parentSpanId, publisherSpan);
      assert.equal(stageSpan(spans, "sentiment").parentSpanId, ingest.spanId);
      assert.equal(stageSpan(spans, "topics").parentSpanId, stageSpan(spans, "sentiment").spanId);
      assert.equal(stageSpan(spans, "dispatch").parentSpanId, stageSpan(spans, "topics").spanId);
    },
  );

  await t.step(
    "a dead-lettered message's span records the failure and its failed event continues the trace",
    async () => {
      const traceId = "5b8efff798038103d269b633813fc60c";
      const publisherSpan = "eee19b7ec3c1b174";
      const h = headers();
      h.set("traceparent", `00-${traceId}-${publisherSpan}-01`);
      // Shaped like an ingested event of item "traced-poison" but invalid: dead-lettered.
      mesh.nc.publish(
        "feedback.ingested.traced-poison",
        JSON.stringify({ type: "feedback.ingested", item_id: "traced-poison" }),
        { headers: h },
      );
      const state = await waitFinal(mesh.gatewayUrl, "traced-poison") as { status: string };
      assert.equal(state.status, "failed");
      const spans = await receiver.waitFor(
        traceId,
        (s) => s.some((x) => x.service === "weft-sentiment"),
      );
      const sentiment = stageSpan(spans, "sentiment");
      assert.equal(sentiment.parentSpanId, publisherSpan);
      assert.ok(sentiment.status === 2 || sentiment.status === "STATUS_CODE_ERROR");
      const jsm = await jetstreamManager(mesh.nc);
      const failed = await jsm.streams.getMessage(FEEDBACK_STREAM, {
        last_by_subj: "feedback.failed.traced-poison",
      });
      assert.equal(
        failed!.header.get("traceparent"),
        `00-${traceId}-${sentiment.spanId}-01`,
        "the failed event's parent is the span that gave up",
      );
      assert.equal(failed!.json<{ trace_id: string }>().trace_id, traceId);
    },
  );
  await t.step(
    "content upload: client -> gateway -> moderation, with and without a traceparent",
    async () => {
      const post = async (h: Record<string, string>) => {
        const r = await fetch(`${mesh.gatewayUrl}/content`, {
          method: "POST",
          headers: { "content-type": "application/json", ...h },
          body: JSON.stringify({ text: "a perfectly friendly note" }),
        });
        assert.equal(r.status, 202, await r.clone().text());
        return (await r.json() as { id: string }).id;
      };
      const traceId = "7c2d5f1a9e3b4c6d8e0f1a2b3c4d5e6f";
      const clientSpan = "1a2b3c4d5e6f7a8b";
      const traced = await post({ traceparent: `00-${traceId}-${clientSpan}-01` });
      const spans = await receiver.waitFor(
        traceId,
        (s) => s.some((x) => x.service === "weft-moderation") && !!gatewaySpanOf(s, "/content"),
      );
      const gateway = gatewaySpanOf(spans, "/content")!;
      assert.equal(gateway.parentSpanId, clientSpan, "the gateway continues the client's trace");
      const moderation = stageSpan(spans, "moderation");
      assert.equal(moderation.attributes["weft.item_id"], traced);
      assert.equal(
        moderation.parentSpanId,
        gateway.spanId,
        "moderation's parent is the POST's span",
      );

      // Without a traceparent the item's trace is the gateway's span's.
      const id = await post({});
      const [own] = await receiver.waitForSpans(
        (s) => s.service === "weft-moderation" && s.attributes["weft.item_id"] === id,
        (s) => s.length > 0,
      );
      const theirs = await receiver.waitFor(own!.traceId, (s) => !!gatewaySpanOf(s, "/content"));
      assert.equal(own!.parentSpanId, gatewaySpanOf(theirs, "/content")!.spanId);
    },
  );
});

Deno.test("a definition's item: its entry event continues the gateway's POST span, and its trace id is that span's", async () => {
  await using receiver = startReceiver();
  await using mesh = await startMesh({
    WEFT_PIPELINES: "pipelines/support/pipeline.ts",
    OTEL_DENO: "true",
    OTEL_EXPORTER_OTLP_PROTOCOL: "http/json",
    OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url,
    OTEL_BSP_SCHEDULE_DELAY: "200",
  });
  const nc = await connectClient(mesh.natsUrl, "weft-test", mesh.credentials("admin"));
  try {
    const jsm = await jetstreamManager(nc);
    const post = async (h: Record<string, string>) => {
      const r = await fetch(`${mesh.gatewayUrl}/pipelines/support/items`, {
        method: "POST",
        headers: { "content-type": "application/json", ...h },
        body: JSON.stringify({ customer: "ann", text: "where is my order" }),
      });
      assert.equal(r.status, 202, await r.clone().text());
      return (await r.json() as { id: string }).id;
    };
    const entryOf = async (id: string) => {
      const m = await jsm.streams.getMessage("SUPPORT", {
        last_by_subj: `support.submitted.${id}`,
      });
      return {
        parent: parseTraceparent(m!.header.get("traceparent"))!,
        traceId: m!.json<{ trace_id: string }>().trace_id,
      };
    };
    const traceId = "9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a";
    const clientSpan = "2b3c4d5e6f7a8b9c";
    const traced = await entryOf(await post({ traceparent: `00-${traceId}-${clientSpan}-01` }));
    const spans = await receiver.waitFor(traceId, (s) => !!gatewaySpanOf(s, "/pipelines/"));
    const gateway = gatewaySpanOf(spans, "/pipelines/")!;
    assert.equal(gateway.parentSpanId, clientSpan, "the gateway continues the client's trace");
    assert.deepEqual(
      [traced.traceId, traced.parent.traceId, traced.parent.spanId],
      [traceId, traceId, gateway.spanId],
    );
    // Without a traceparent: the item's trace id is the gateway span's trace, not another.
    const own = await entryOf(await post({}));
    const theirs = await receiver.waitFor(
      own.parent.traceId,
      (s) => !!gatewaySpanOf(s, "/pipelines/"),
    );
    assert.equal(own.parent.spanId, gatewaySpanOf(theirs, "/pipelines/")!.spanId);
    assert.equal(own.traceId, own.parent.traceId, "the item's trace id is its spans' trace");
  } finally {
    await nc.close();
  }
});
