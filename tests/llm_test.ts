import assert from "node:assert/strict";
import type { SentimentAnalyzer, SentimentResult } from "../src/ai/analysis.ts";
import {
  createLlmAnalyzers,
  createLlmSentimentAnalyzer,
  createLlmTopicsAnalyzer,
  createLlmToxicityAnalyzer,
  type LlmAnalyzerOptions,
} from "../src/ai/llm/analyzers.ts";
import { createBudget } from "../src/ai/llm/budget.ts";
import { cacheKey, createLruCache, MAX_CACHED_ANSWER_CHARS } from "../src/ai/llm/cache.ts";
import { createChatClient, type LlmLogEntry } from "../src/ai/llm/client.ts";
import {
  LlmError,
  LlmHttpError,
  LlmInvalidOutputError,
  LlmOverBudgetError,
  LlmTimeoutError,
} from "../src/ai/llm/errors.ts";
import { withFallback } from "../src/ai/llm/fallback.ts";
import { loadPrompt, renderPrompt } from "../src/ai/llm/prompts.ts";
import { createRateLimiter, parseRetryAfter } from "../src/ai/llm/rate_limit.ts";
import { createLlmStats } from "../src/ai/llm/stats.ts";
import { createFakeClock, type FakeClock } from "./helpers/fake_clock.ts";
import {
  chat,
  type FakeOpenAI,
  type FakeReply,
  type FakeScript,
  startFakeOpenAI,
} from "./helpers/openai_server.ts";

const KEY = "sk-test-secret-0123456789";
const MODEL = "test-model";
const PRICING = { inputPer1k: 0.01, outputPer1k: 0.03 };
const PROMPTS = {
  sentiment: await loadPrompt("sentiment", "v1"),
  topics: await loadPrompt("topics", "v1"),
  toxicity: await loadPrompt("toxicity", "v1"),
};
const TAXONOMY = ["billing", "shipping", "product_quality", "other"];

const embedded: SentimentAnalyzer = {
  name: "embedded",
  analyze: (): SentimentResult => ({ label: "neutral", score: 0, analyzer: "embedded" }),
};

function httpError(
  status: number,
  message: string,
  headers: Record<string, string> = {},
): FakeReply {
  return { kind: "error", status, message, type: "server_error", code: "oops", headers };
}

async function withServer(
  script: FakeScript,
  fn: (server: FakeOpenAI, clock: FakeClock) => Promise<void>,
  clock: FakeClock = createFakeClock(),
): Promise<void> {
  const server = startFakeOpenAI(script);
  try {
    await fn(server, clock);
  } finally {
    await server.close();
  }
}

function options(
  server: FakeOpenAI,
  clock: FakeClock,
  extra: Partial<LlmAnalyzerOptions> = {},
): LlmAnalyzerOptions {
  return {
    baseUrl: server.baseUrl,
    apiKey: KEY,
    model: MODEL,
    pricing: PRICING,
    prompt: PROMPTS.sentiment,
    clock,
    random: () => 0.5,
    retry: { maxRetries: 3, baseDelayMs: 250, maxDelayMs: 8000 },
    ...extra,
  };
}

async function rejectsWith(p: Promise<unknown>, code: string): Promise<LlmError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof LlmError, `expected an LlmError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    return e;
  }
  assert.fail(`expected a rejection with code ${code}`);
}

function closeTo(actual: number, expected: number): void {
  assert.ok(Math.abs(actual - expected) < 1e-12, `${actual} is not ${expected}`);
}

Deno.test("llm analyzers speak the OpenAI chat-completions wire format", async (t) => {
  await t.step(
    "sentiment returns a validated result with usage, cost, prompt version and analyzer name",
    () =>
      withServer([chat({ label: "positive", score: 0.8 })], async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(options(server, clock));
        const r = await sentiment.analyze("I love the new dashboard");
        assert.equal(r.label, "positive");
        assert.equal(r.score, 0.8);
        assert.equal(r.analyzer, "llm:test-model");
        assert.equal(sentiment.name, "llm:test-model");
        assert.equal(r.prompt_version, "v1");
        assert.equal(r.cached, false);
        assert.equal(r.repaired, false);
        assert.equal(r.usage.prompt_tokens, 100);
        assert.equal(r.usage.completion_tokens, 20);
        assert.equal(r.usage.total_tokens, 120);
        closeTo(r.usage.cost_usd, 0.1 * 0.01 + 0.02 * 0.03);

        assert.equal(server.requests.length, 1);
        const req = server.requests[0]!;
        assert.equal(req.method, "POST");
        assert.equal(req.path, "/v1/chat/completions");
        assert.equal(req.authorization, `Bearer ${KEY}`);
        assert.match(req.contentType ?? "", /application\/json/);
        assert.equal(req.body.model, MODEL);
        assert.equal(req.body.temperature, 0);
        assert.deepEqual(req.body.response_format, { type: "json_object" });
        assert.equal(req.body.messages.length, 2);
        assert.equal(req.body.messages[0]!.role, "system");
        assert.match(req.body.messages[0]!.content, /sentiment/);
        assert.match(req.body.messages[0]!.content, /"minimum":-1/);
        assert.doesNotMatch(req.body.messages[0]!.content, /\{\{/);
        assert.deepEqual(req.body.messages[1], {
          role: "user",
          content: "I love the new dashboard",
        });
      }),
  );

  await t.step("topics keeps to the taxonomy and gives evidence for every topic", () =>
    withServer(
      [chat({ topics: ["shipping", "billing"], evidence: { shipping: ["late parcel"] } })],
      async (server, clock) => {
        const topics = createLlmTopicsAnalyzer({
          ...options(server, clock, { prompt: PROMPTS.topics }),
          taxonomy: TAXONOMY,
        });
        const r = await topics.analyze("Late parcel and a double charge");
        assert.deepEqual(r.topics, ["shipping", "billing"]);
        assert.deepEqual(r.evidence, { shipping: ["late parcel"], billing: [] });
        assert.equal(r.analyzer, "llm:test-model");
        assert.match(server.requests[0]!.body.messages[0]!.content, /billing, shipping/);
      },
    ));

  await t.step("toxicity returns flagged, categories and a score", () =>
    withServer(
      [chat({ flagged: true, categories: ["insult"], score: 0.93 })],
      async (server, clock) => {
        const toxicity = createLlmToxicityAnalyzer(
          options(server, clock, { prompt: PROMPTS.toxicity }),
        );
        const r = await toxicity.analyze("you are all idiots");
        assert.equal(r.flagged, true);
        assert.deepEqual(r.categories, ["insult"]);
        assert.equal(r.score, 0.93);
        assert.equal(r.prompt_version, "v1");
      },
    ));

  await t.step(
    "an error body is reported with its type and code, without the api key",
    () =>
      withServer(
        [{
          kind: "error",
          status: 401,
          message: "Incorrect API key provided",
          type: "invalid_request_error",
          code: "invalid_api_key",
        }],
        async (server, clock) => {
          const sentiment = createLlmSentimentAnalyzer(options(server, clock));
          const e = await rejectsWith(sentiment.analyze("hello"), "http_error");
          assert.ok(e instanceof LlmHttpError);
          assert.equal(e.name, "LlmHttpError");
          assert.equal(e.status, 401);
          assert.equal(e.errorType, "invalid_request_error");
          assert.equal(e.errorCode, "invalid_api_key");
          assert.match(e.message, /Incorrect API key provided/);
          assert.doesNotMatch(`${e.message} ${e.stack} ${JSON.stringify(e)}`, /sk-test-secret/);
          assert.equal(server.requests.length, 1, "a 401 is not retried");
        },
      ),
  );

  await t.step(
    "a provider's error message is cut to 200 characters and never keeps the api key it quotes",
    () =>
      withServer(
        [{
          kind: "error",
          status: 401,
          // A proxy quoting the request's key, then a very long message.
          message: `Incorrect API key provided: Bearer ${KEY}. ${"E".repeat(600_000)}`,
          type: "invalid_request_error",
          code: "invalid_api_key",
        }],
        async (server, clock) => {
          const sentiment = createLlmSentimentAnalyzer(options(server, clock));
          const e = await rejectsWith(sentiment.analyze("hello"), "http_error");
          assert.match(e.message, /Incorrect API key provided: Bearer \*\*\*/);
          assert.doesNotMatch(`${e.message} ${JSON.stringify(e)}`, /sk-test-secret/);
          assert.ok(e.message.length < 400, `message of ${e.message.length} characters`);
        },
      ),
  );

  await t.step(
    "a prompt of the wrong kind is refused at construction",
    () =>
      withServer([], (server, clock) => {
        assert.throws(
          () => createLlmSentimentAnalyzer(options(server, clock, { prompt: PROMPTS.topics })),
          TypeError,
        );
        return Promise.resolve();
      }),
  );
});

Deno.test("llm output is validated against a JSON schema with one repair attempt", async (t) => {
  await t.step(
    "malformed content is repaired once and the repair request quotes the error",
    () =>
      withServer(
        [chat("Sure! The sentiment is positive."), chat({ label: "positive", score: 0.6 })],
        async (server, clock) => {
          const sentiment = createLlmSentimentAnalyzer(options(server, clock));
          const r = await sentiment.analyze("Great support team");
          assert.equal(r.label, "positive");
          assert.equal(r.repaired, true);
          assert.equal(r.usage.total_tokens, 240, "usage adds up both requests");
          assert.equal(server.requests.length, 2);
          const repair = server.requests[1]!.body.messages;
          assert.equal(repair.length, 4);
          assert.deepEqual(repair[2], {
            role: "assistant",
            content: "Sure! The sentiment is positive.",
          });
          assert.equal(repair[3]!.role, "user");
          assert.match(repair[3]!.content, /not valid JSON/);
          assert.match(repair[3]!.content, /corrected JSON/);
          assert.equal(sentiment.stats.snapshot().repairs, 1);
        },
      ),
  );

  await t.step("a schema mismatch quotes the failing path in the repair request", () =>
    withServer(
      [chat({ label: "great", score: 3 }), chat({ label: "positive", score: 1 })],
      async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(options(server, clock));
        const r = await sentiment.analyze("wonderful");
        assert.equal(r.score, 1);
        const quoted = server.requests[1]!.body.messages[3]!.content;
        assert.match(quoted, /\$\/label must be equal to one of the allowed values/);
        assert.match(quoted, /\$\/score must be <= 1/);
      },
    ));

  await t.step("output still invalid after the repair fails with invalid_output", () =>
    withServer(
      [chat({ label: "meh" }), chat({ label: "meh", score: 0 })],
      async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(options(server, clock));
        const e = await rejectsWith(sentiment.analyze("ok I guess"), "invalid_output");
        assert.ok(e instanceof LlmInvalidOutputError);
        assert.equal(e.usage?.total_tokens, 240, "the error says what the attempts cost");
        assert.equal(server.requests.length, 2, "exactly one repair");
        const s = sentiment.stats.snapshot();
        assert.equal(s.failures, 1);
        assert.equal(s.total_tokens, 240);
      },
    ));

  await t.step("a topic outside the taxonomy is a schema mismatch", () =>
    withServer(
      [chat({ topics: ["weather"], evidence: {} }), chat({ topics: ["other"], evidence: {} })],
      async (server, clock) => {
        const topics = createLlmTopicsAnalyzer({
          ...options(server, clock, { prompt: PROMPTS.topics }),
          taxonomy: TAXONOMY,
        });
        const r = await topics.analyze("It rained");
        assert.deepEqual(r.topics, ["other"]);
        assert.match(server.requests[1]!.body.messages[3]!.content, /\$\/topics\/0/);
      },
    ));

  await t.step("JSON wrapped in a code fence is accepted without a repair", () =>
    withServer(
      [chat('```json\n{"label":"negative","score":-0.7}\n```')],
      async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(options(server, clock));
        const r = await sentiment.analyze("awful");
        assert.equal(r.label, "negative");
        assert.equal(r.repaired, false);
        assert.equal(server.requests.length, 1);
      },
    ));
});

Deno.test("llm client retries what is worth retrying and nothing else", async (t) => {
  await t.step(
    "500s are retried with exponential backoff and jitter, then succeed",
    () =>
      withServer(
        [
          httpError(500, "boom"),
          httpError(503, "overloaded"),
          chat({ label: "neutral", score: 0 }),
        ],
        async (server, clock) => {
          const sentiment = createLlmSentimentAnalyzer(options(server, clock));
          const r = await sentiment.analyze("fine");
          assert.equal(r.label, "neutral");
          assert.equal(server.requests.length, 3);
          // full jitter with random() = 0.5: half of 250 * 2^n
          assert.deepEqual(clock.sleeps, [125, 250]);
          const s = sentiment.stats.snapshot();
          assert.equal(s.requests, 3);
          assert.equal(s.retries, 2);
          assert.equal(s.calls, 1);
        },
      ),
  );

  await t.step("backoff is capped by maxDelayMs", () =>
    withServer(
      [
        httpError(500, "a"),
        httpError(500, "b"),
        httpError(500, "c"),
        chat({
          label: "neutral",
          score: 0,
        }),
      ],
      async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(
          options(server, clock, {
            random: () => 1,
            retry: { maxRetries: 3, baseDelayMs: 100, maxDelayMs: 300 },
          }),
        );
        await sentiment.analyze("x");
        assert.deepEqual(clock.sleeps, [100, 200, 300]);
      },
    ));

  await t.step(
    "a 400 is not retried",
    () =>
      withServer([httpError(400, "bad request")], async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(options(server, clock));
        const e = await rejectsWith(sentiment.analyze("x"), "http_error");
        assert.equal(e.status, 400);
        assert.equal(e.retryable, false);
        assert.equal(server.requests.length, 1);
        assert.deepEqual(clock.sleeps, []);
      }),
  );

  await t.step("a 408 is retried", () =>
    withServer(
      [httpError(408, "request timeout"), chat({ label: "neutral", score: 0 })],
      async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(options(server, clock));
        await sentiment.analyze("x");
        assert.equal(server.requests.length, 2);
      },
    ));

  await t.step("retries stop after maxRetries with the last error", () =>
    withServer(
      [httpError(502, "bad gateway"), httpError(502, "still bad")],
      async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(
          options(server, clock, { retry: { maxRetries: 1, baseDelayMs: 10 } }),
        );
        const e = await rejectsWith(sentiment.analyze("x"), "http_error");
        assert.equal(e.status, 502);
        assert.match(e.message, /still bad/);
        assert.equal(server.requests.length, 2);
      },
    ));

  await t.step(
    "a 2xx body that is not a chat completion is an http_error",
    () =>
      withServer(
        [{ kind: "raw", status: 200, body: "<html>proxy</html>" }],
        async (server, clock) => {
          const sentiment = createLlmSentimentAnalyzer(options(server, clock));
          await rejectsWith(sentiment.analyze("x"), "http_error");
        },
      ),
  );

  await t.step("network errors are retried, then reported as network", async () => {
    const gone = startFakeOpenAI([]);
    const baseUrl = gone.baseUrl;
    await gone.close();
    const clock = createFakeClock();
    const stats = createLlmStats();
    const client = createChatClient({
      baseUrl,
      apiKey: KEY,
      model: MODEL,
      clock,
      random: () => 0.5,
      stats,
      retry: { maxRetries: 2, baseDelayMs: 10 },
    });
    const e = await rejectsWith(client.complete([{ role: "user", content: "x" }]), "network");
    assert.equal(e.name, "LlmNetworkError");
    assert.ok(e.cause !== undefined);
    assert.equal(stats.snapshot().requests, 3);
    assert.deepEqual(clock.sleeps, [5, 10]);
  });
});

Deno.test("llm client honours 429 and Retry-After", async (t) => {
  await t.step("Retry-After in seconds delays the retry by that many seconds", () =>
    withServer(
      [httpError(429, "slow down", { "retry-after": "1" }), chat({ label: "neutral", score: 0 })],
      async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(options(server, clock));
        const r = await sentiment.analyze("x");
        assert.equal(r.label, "neutral");
        assert.deepEqual(clock.sleeps, [1000]);
        assert.equal(server.requests.length, 2);
      },
    ));

  await t.step("Retry-After as an HTTP date is honoured", () => {
    const clock = createFakeClock();
    const retryAt = new Date(clock.now() + 2000).toUTCString();
    return withServer(
      [
        httpError(429, "slow down", { "retry-after": retryAt }),
        chat({ label: "neutral", score: 0 }),
      ],
      async (server) => {
        const sentiment = createLlmSentimentAnalyzer(options(server, clock));
        await sentiment.analyze("x");
        assert.deepEqual(clock.sleeps, [2000]);
      },
      clock,
    );
  });

  await t.step("a 429 without Retry-After backs off like a 5xx", () =>
    withServer(
      [httpError(429, "slow down"), chat({ label: "neutral", score: 0 })],
      async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(options(server, clock));
        await sentiment.analyze("x");
        assert.deepEqual(clock.sleeps, [125]);
      },
    ));

  await t.step("a Retry-After past the deadline fails at once with rate_limited", () =>
    withServer(
      [httpError(429, "quota", { "retry-after": "60" })],
      async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(options(server, clock, { timeoutMs: 5000 }));
        const e = await rejectsWith(sentiment.analyze("x"), "rate_limited");
        assert.equal(e.retryAfterMs, 60_000);
        assert.deepEqual(clock.sleeps, []);
        assert.equal(server.requests.length, 1);
      },
    ));

  await t.step("a 503 with Retry-After waits as asked", () =>
    withServer(
      [httpError(503, "maintenance", { "retry-after": "2" }), chat({ label: "neutral", score: 0 })],
      async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(options(server, clock));
        await sentiment.analyze("x");
        assert.deepEqual(clock.sleeps, [2000]);
      },
    ));

  await t.step(
    "a huge Retry-After that the call gives up on does not pause the stage's later calls",
    () =>
      withServer(
        [
          httpError(429, "quota", { "retry-after": "1000000000" }),
          httpError(503, "maintenance", { "retry-after": "1000000000" }),
          chat({ label: "neutral", score: 0 }),
        ],
        async (server, clock) => {
          const sentiment = createLlmSentimentAnalyzer(options(server, clock, { timeoutMs: 5000 }));
          const e = await rejectsWith(sentiment.analyze("x"), "rate_limited");
          assert.equal(e.retryAfterMs, 60_000, "Retry-After is capped at 60 s");
          await rejectsWith(sentiment.analyze("y"), "http_error");
          const r = await sentiment.analyze("z");
          assert.equal(r.label, "neutral");
          assert.equal(server.requests.length, 3);
          assert.deepEqual(clock.sleeps, [], "no call waited for the refused Retry-After");
        },
      ),
  );

  await t.step("a huge Retry-After is waited for at most 60 s", () =>
    withServer(
      [
        httpError(429, "quota", { "retry-after": "1000000000" }),
        chat({ label: "neutral", score: 0 }),
        chat({ label: "neutral", score: 0 }),
      ],
      async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(
          options(server, clock, { timeoutMs: Infinity }),
        );
        await sentiment.analyze("x");
        assert.deepEqual(clock.sleeps, [60_000]);
        await sentiment.analyze("y");
        assert.deepEqual(clock.sleeps, [60_000], "the pause ended with the wait");
        assert.equal(server.requests.length, 3);
      },
    ));

  await t.step("a 429 pauses the whole stage until Retry-After has passed", async () => {
    const clock = createFakeClock();
    const limiter = createRateLimiter(undefined, clock);
    limiter.pauseUntil(clock.now() + 1500);
    await limiter.acquire();
    assert.deepEqual(clock.sleeps, [1500]);
    await limiter.acquire();
    assert.deepEqual(clock.sleeps, [1500], "no wait once the pause is over");
  });

  await t.step("parseRetryAfter reads seconds and HTTP dates and ignores junk", () => {
    const now = Date.parse("Wed, 21 Oct 2015 07:28:00 GMT");
    assert.equal(parseRetryAfter("3", now), 3000);
    assert.equal(parseRetryAfter("0.5", now), 500);
    assert.equal(parseRetryAfter("Wed, 21 Oct 2015 07:28:04 GMT", now), 4000);
    assert.equal(parseRetryAfter("Wed, 21 Oct 2015 07:27:00 GMT", now), 0);
    assert.equal(parseRetryAfter("1000000000", now), 60_000);
    assert.equal(parseRetryAfter("9".repeat(400), now), 60_000);
    assert.equal(parseRetryAfter("Wed, 21 Oct 2099 07:28:00 GMT", now), 60_000);
    assert.equal(parseRetryAfter("soon", now), undefined);
    assert.equal(parseRetryAfter(null, now), undefined);
  });
});

Deno.test("llm timeouts and fallback", async (t) => {
  await t.step(
    "a slow response fails with timeout after the stage deadline",
    () =>
      withServer([{ kind: "hang" }], async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(options(server, clock, { timeoutMs: 50 }));
        const e = await rejectsWith(sentiment.analyze("x"), "timeout");
        assert.ok(e instanceof LlmTimeoutError);
        assert.equal(sentiment.stats.snapshot().failures, 1);
      }),
  );

  await t.step(
    "a response slower than the timeout is cut off",
    () =>
      withServer(
        [chat({ label: "neutral", score: 0 }, undefined, 5_000)],
        async (server, clock) => {
          const sentiment = createLlmSentimentAnalyzer(options(server, clock, { timeoutMs: 50 }));
          await rejectsWith(sentiment.analyze("x"), "timeout");
        },
      ),
  );

  await t.step(
    "llm sentiment falls back to the embedded analyzer after a timeout",
    () =>
      withServer([{ kind: "hang" }], async (server, clock) => {
        const llm = createLlmSentimentAnalyzer(options(server, clock, { timeoutMs: 50 }));
        const reasons: string[] = [];
        const sentiment = withFallback(llm, embedded, { onFallback: (r) => reasons.push(r) });
        const r = await sentiment.analyze("x");
        assert.equal(r.analyzer, "embedded");
        assert.ok("fallback_reason" in r);
        assert.equal(r.fallback_reason, "timeout");
        assert.equal(r.fallback_from, "llm:test-model");
        assert.deepEqual(reasons, ["timeout"]);
        assert.equal(llm.stats.snapshot().fallbacks, 1);
        assert.equal(sentiment.name, "llm:test-model>embedded");
      }),
  );

  await t.step(
    "the fallback records what a failed LLM attempt spent",
    () =>
      withServer([chat("nope"), chat("still nope")], async (server, clock) => {
        const sentiment = withFallback(
          createLlmSentimentAnalyzer(options(server, clock)),
          embedded,
        );
        const r = await sentiment.analyze("x");
        assert.ok("fallback_reason" in r);
        assert.equal(r.fallback_reason, "invalid_output");
        assert.equal(r.usage?.total_tokens, 240);
      }),
  );

  await t.step(
    "a successful LLM answer passes through the fallback wrapper untouched",
    () =>
      withServer([chat({ label: "positive", score: 0.5 })], async (server, clock) => {
        const sentiment = withFallback(
          createLlmSentimentAnalyzer(options(server, clock)),
          embedded,
        );
        const r = await sentiment.analyze("x");
        assert.equal(r.analyzer, "llm:test-model");
        assert.ok(!("fallback_reason" in r));
      }),
  );

  await t.step("a caller's abort is rethrown, not answered by the fallback", async () => {
    const controller = new AbortController();
    await withServer(() => {
      controller.abort(new Error("shutting down"));
      return { kind: "hang" };
    }, async (server, clock) => {
      const llm = createLlmSentimentAnalyzer(options(server, clock));
      const sentiment = withFallback(llm, embedded);
      await rejectsWith(sentiment.analyze("x", { signal: controller.signal }), "aborted");
      assert.equal(llm.stats.snapshot().fallbacks, 0);
    });
  });
});

Deno.test("llm flow control bounds concurrency and rate per stage", async (t) => {
  await t.step("concurrency never exceeds the configured limit", () =>
    withServer(
      () => chat({ label: "neutral", score: 0 }, undefined, 20),
      async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(options(server, clock, { concurrency: 2 }));
        const texts = ["a", "b", "c", "d", "e", "f"];
        const results = await Promise.all(texts.map((x) => sentiment.analyze(x)));
        assert.equal(results.length, 6);
        assert.equal(server.requests.length, 6);
        assert.equal(server.maxInFlight, 2);
      },
    ));

  await t.step("the token bucket spaces requests at the configured rate", () =>
    withServer(
      () => chat({ label: "neutral", score: 0 }),
      async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(
          options(server, clock, { rateLimit: { requestsPerSecond: 2, burst: 1 } }),
        );
        for (const x of ["a", "b", "c"]) await sentiment.analyze(x);
        assert.deepEqual(clock.sleeps, [500, 500]);
      },
    ));

  await t.step("a burst is allowed at once, then the rate applies", async () => {
    const clock = createFakeClock();
    const limiter = createRateLimiter({ requestsPerSecond: 4, burst: 3 }, clock);
    for (let i = 0; i < 4; i++) await limiter.acquire();
    assert.deepEqual(clock.sleeps, [250]);
  });
});

Deno.test("llm results are cached by content hash, prompt version and model", async (t) => {
  await t.step(
    "a repeated text is answered from the cache without a second call",
    () =>
      withServer([chat({ label: "positive", score: 0.9 })], async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(options(server, clock));
        await sentiment.analyze("same text");
        const r = await sentiment.analyze("same text");
        assert.equal(server.requests.length, 1);
        assert.equal(r.cached, true);
        assert.equal(r.label, "positive");
        assert.equal(r.usage.total_tokens, 0);
        assert.equal(r.usage.cost_usd, 0);
        assert.equal(sentiment.stats.snapshot().cache_hits, 1);
        assert.equal(sentiment.stats.snapshot().calls, 1);
      }),
  );

  await t.step(
    "another prompt version or model misses the shared cache",
    () =>
      withServer(() => chat({ label: "positive", score: 0.9 }), async (server, clock) => {
        const cache = createLruCache({ maxEntries: 10 });
        const v1 = createLlmSentimentAnalyzer(options(server, clock, { cache }));
        const v2 = createLlmSentimentAnalyzer(
          options(server, clock, { cache, prompt: { ...PROMPTS.sentiment, version: "v2" } }),
        );
        const other = createLlmSentimentAnalyzer(options(server, clock, { cache, model: "other" }));
        await v1.analyze("t");
        await v1.analyze("t");
        const r2 = await v2.analyze("t");
        await other.analyze("t");
        assert.equal(server.requests.length, 3);
        assert.equal(r2.prompt_version, "v2");
        assert.equal(cache.size, 3);
      }),
  );

  await t.step(
    "cache null disables caching",
    () =>
      withServer(() => chat({ label: "positive", score: 0.9 }), async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(options(server, clock, { cache: null }));
        await sentiment.analyze("t");
        await sentiment.analyze("t");
        assert.equal(server.requests.length, 2);
      }),
  );

  await t.step(
    "an answer larger than MAX_CACHED_ANSWER_CHARS is returned but not cached",
    () =>
      withServer(
        () => chat({ label: "positive", score: 0.9, pad: "x".repeat(MAX_CACHED_ANSWER_CHARS) }),
        async (server, clock) => {
          const cache = createLruCache({ maxEntries: 10 });
          const sentiment = createLlmSentimentAnalyzer(options(server, clock, { cache }));
          const r = await sentiment.analyze("padded");
          assert.equal(r.label, "positive");
          assert.equal("pad" in r, false);
          assert.equal(cache.size, 0);
          const again = await sentiment.analyze("padded");
          assert.equal(again.cached, false);
          assert.equal(server.requests.length, 2);
        },
      ),
  );

  await t.step("the LRU evicts the least recently used entry", async () => {
    const cache = createLruCache({ maxEntries: 2 });
    await cache.set("a", 1);
    await cache.set("b", 2);
    assert.equal(await cache.get("a"), 1);
    await cache.set("c", 3);
    assert.equal(await cache.get("b"), undefined);
    assert.equal(await cache.get("a"), 1);
    assert.equal(await cache.get("c"), 3);
    assert.equal(cache.size, 2);
  });

  await t.step(
    "cache keys are valid NATS KV keys built from kind, version, model and hash",
    async () => {
      const key = await cacheKey({
        kind: "sentiment",
        promptVersion: "v1",
        model: "meta/llama:3",
        text: "hi",
      });
      assert.match(key, /^sentiment\.v1\.meta_llama_3\.[0-9a-f]{64}$/);
      assert.match(key, /^[-/_=.a-zA-Z0-9]+$/);
    },
  );
});

Deno.test("llm budget stops calls once spent", async (t) => {
  await t.step(
    "over a token budget the analyzer does not call and the fallback decides",
    () =>
      withServer(() => chat({ label: "positive", score: 0.9 }), async (server, clock) => {
        const llm = createLlmSentimentAnalyzer(
          options(server, clock, { budget: { maxTokens: 100 } }),
        );
        const sentiment = withFallback(llm, embedded);
        const first = await sentiment.analyze("one");
        assert.equal(first.analyzer, "llm:test-model");
        const second = await sentiment.analyze("two");
        assert.equal(second.analyzer, "embedded");
        assert.ok("fallback_reason" in second);
        assert.equal(second.fallback_reason, "over_budget");
        // No call was made for it: it carries no usage (docs/LLM.md), not one of all zeros.
        assert.ok(!("usage" in second), `no usage: ${JSON.stringify(second)}`);
        assert.equal(server.requests.length, 1);
        const s = llm.stats.snapshot();
        assert.equal(s.over_budget, 1);
        assert.equal(s.fallbacks, 1);
      }),
  );

  await t.step(
    "a cost budget refuses with over_budget",
    () =>
      withServer(() => chat({ label: "positive", score: 0.9 }), async (server, clock) => {
        const sentiment = createLlmSentimentAnalyzer(
          options(server, clock, { budget: { maxCostUsd: 0.001 } }),
        );
        await sentiment.analyze("one");
        const e = await rejectsWith(sentiment.analyze("two"), "over_budget");
        assert.ok(e instanceof LlmOverBudgetError);
        assert.match(e.message, /USD/);
      }),
  );

  await t.step("a budget window resets spending when it ends", () => {
    const clock = createFakeClock();
    const budget = createBudget({ maxTokens: 100, windowMs: 60_000 }, clock);
    budget.record({ prompt_tokens: 90, completion_tokens: 20, total_tokens: 110, cost_usd: 0 });
    assert.match(budget.exceeded() ?? "", /110 tokens/);
    clock.advance(59_999);
    assert.notEqual(budget.exceeded(), undefined);
    clock.advance(1);
    assert.equal(budget.exceeded(), undefined);
    assert.equal(budget.snapshot().tokens, 0);
  });

  await t.step(
    "a budget object can be shared by several analyzers",
    () =>
      withServer(() => chat({ label: "positive", score: 0.9 }), async (server, clock) => {
        const budget = createBudget({ maxTokens: 100 }, clock);
        const a = createLlmSentimentAnalyzer(options(server, clock, { budget }));
        const b = createLlmSentimentAnalyzer(options(server, clock, { budget }));
        await a.analyze("one");
        await rejectsWith(b.analyze("two"), "over_budget");
      }),
  );
});

function rawChat(content: unknown, usage: string): FakeReply {
  return {
    kind: "raw",
    status: 200,
    body: `{"choices":[{"index":0,"message":{"role":"assistant","content":${
      JSON.stringify(JSON.stringify(content))
    }},"finish_reason":"stop"}],"usage":${usage}}`,
  };
}

Deno.test("llm usage is taken only as non-negative integers", async (t) => {
  await t.step(
    "negative, infinite or fractional token counts are counted as 0, the total never below the parts",
    () =>
      withServer(
        [
          rawChat(
            { label: "neutral", score: 0 },
            '{"prompt_tokens":-1e12,"completion_tokens":20,"total_tokens":1e400}',
          ),
          rawChat(
            { label: "neutral", score: 0 },
            '{"prompt_tokens":100,"completion_tokens":2.5,"total_tokens":-7}',
          ),
          rawChat(
            { label: "neutral", score: 0 },
            '{"prompt_tokens":1e400,"completion_tokens":"20","total_tokens":3}',
          ),
        ],
        async (server, clock) => {
          const sentiment = createLlmSentimentAnalyzer(options(server, clock, { cache: null }));
          const a = await sentiment.analyze("a");
          assert.deepEqual(a.usage, {
            prompt_tokens: 0,
            completion_tokens: 20,
            total_tokens: 20,
            cost_usd: a.usage.cost_usd,
          });
          closeTo(a.usage.cost_usd, 0.02 * 0.03);
          const b = await sentiment.analyze("b");
          assert.deepEqual(
            [b.usage.prompt_tokens, b.usage.completion_tokens, b.usage.total_tokens],
            [100, 0, 100],
          );
          const c = await sentiment.analyze("c");
          assert.deepEqual(
            [c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens],
            [0, 0, 3],
          );
          const s = sentiment.stats.snapshot();
          assert.equal(s.prompt_tokens, 100);
          assert.equal(s.total_tokens, 123);
          assert.ok(s.cost_usd >= 0);
        },
      ),
  );

  await t.step(
    "a negative prompt_tokens does not lower the spend under a cost budget",
    () =>
      withServer(
        () =>
          rawChat({ label: "neutral", score: 0 }, '{"prompt_tokens":-1e12,"completion_tokens":20}'),
        async (server, clock) => {
          const sentiment = createLlmSentimentAnalyzer(
            options(server, clock, { cache: null, budget: { maxCostUsd: 0.001 } }),
          );
          await sentiment.analyze("one"); // 0.0006 USD
          await sentiment.analyze("two"); // 0.0012 USD
          await rejectsWith(sentiment.analyze("three"), "over_budget");
          assert.equal(server.requests.length, 2);
        },
      ),
  );

  await t.step("a budget never records a negative or unknown spend", () => {
    const budget = createBudget({ maxCostUsd: 1, maxTokens: 100 });
    budget.record({ prompt_tokens: 0, completion_tokens: 0, total_tokens: -1e12, cost_usd: -3e6 });
    budget.record({ prompt_tokens: 0, completion_tokens: 0, total_tokens: NaN, cost_usd: NaN });
    assert.deepEqual(
      [budget.snapshot().cost_usd, budget.snapshot().tokens],
      [0, 0],
    );
    budget.record({ prompt_tokens: 0, completion_tokens: 0, total_tokens: 10, cost_usd: 1 });
    assert.match(budget.exceeded() ?? "", /USD/);
  });
});

Deno.test("llm stats count tokens, cost, calls, failures and fallbacks", async () => {
  await withServer(
    [chat({ label: "positive", score: 1 }), httpError(400, "bad")],
    async (server, clock) => {
      const stats = createLlmStats();
      const llm = createLlmSentimentAnalyzer(options(server, clock, { stats }));
      const sentiment = withFallback(llm, embedded);
      await sentiment.analyze("one");
      await sentiment.analyze("one");
      await sentiment.analyze("two");
      const s = stats.snapshot();
      assert.equal(s.calls, 2);
      assert.equal(s.requests, 2);
      assert.equal(s.cache_hits, 1);
      assert.equal(s.failures, 1);
      assert.equal(s.fallbacks, 1);
      assert.equal(s.prompt_tokens, 100);
      assert.equal(s.completion_tokens, 20);
      assert.equal(s.total_tokens, 120);
      closeTo(s.cost_usd, 0.0016);
    },
  );
});

Deno.test("llm log entries carry neither the api key nor the text", async () => {
  const entries: LlmLogEntry[] = [];
  await withServer(
    [
      httpError(503, "busy"),
      chat("SECRET-TEXT is positive"),
      chat({ label: "positive", score: 1 }),
    ],
    async (server, clock) => {
      const sentiment = createLlmSentimentAnalyzer(
        options(server, clock, { logger: (e) => entries.push(e) }),
      );
      await sentiment.analyze("SECRET-TEXT");
    },
  );
  assert.deepEqual(entries.map((e) => e.message), [
    "retrying LLM request",
    "invalid LLM output, asking for a repair",
  ]);
  assert.equal(entries[0]!.fields.status, 503);
  assert.equal(entries[1]!.fields.reason, "json");
  const text = JSON.stringify(entries);
  assert.doesNotMatch(text, /sk-test-secret/);
  assert.doesNotMatch(text, /SECRET-TEXT/);
});

Deno.test("llm prompt templates are versioned files", async (t) => {
  await t.step("each analyzer's v1 prompt loads from prompts/ with its placeholders", () => {
    assert.equal(PROMPTS.sentiment.version, "v1");
    assert.match(PROMPTS.sentiment.text, /\{\{schema\}\}/);
    assert.match(PROMPTS.topics.text, /\{\{taxonomy\}\}/);
    assert.match(PROMPTS.toxicity.text, /\{\{categories\}\}/);
  });

  await t.step("a missing version is an error", async () => {
    await assert.rejects(loadPrompt("sentiment", "v999"), Deno.errors.NotFound);
    await assert.rejects(loadPrompt("../etc", "v1"), TypeError);
  });

  await t.step("a placeholder without a value is an error", () => {
    assert.throws(() => renderPrompt("{{nope}}", {}), /nope/);
  });

  await t.step(
    "createLlmAnalyzers builds all three stages with shared stats",
    () =>
      withServer((req) => {
        const system = req.body.messages[0]!.content;
        if (system.includes("topics")) return chat({ topics: ["billing"], evidence: {} });
        if (system.includes("toxicity")) return chat({ flagged: false, categories: [], score: 0 });
        return chat({ label: "negative", score: -0.4 });
      }, async (server) => {
        const llm = await createLlmAnalyzers({
          baseUrl: server.baseUrl,
          apiKey: KEY,
          model: MODEL,
          taxonomy: TAXONOMY,
          stages: { sentiment: { timeoutMs: 2000, concurrency: 1 } },
        });
        const [s, tp, x] = await Promise.all([
          llm.sentiment.analyze("charged twice"),
          llm.topics.analyze("charged twice"),
          llm.toxicity.analyze("charged twice"),
        ]);
        assert.equal(s.label, "negative");
        assert.deepEqual(tp.topics, ["billing"]);
        assert.equal(x.flagged, false);
        assert.equal(llm.stats.snapshot().calls, 3);
        assert.equal(llm.sentiment.promptVersion, "v1");
      }),
  );
});

Deno.test("llm errors have stable codes, names and causes", () => {
  const cause = new Error("root");
  const e = new LlmError("network", "x", { cause });
  assert.equal(e.name, "LlmError");
  assert.equal(e.cause, cause);
  assert.equal(new LlmTimeoutError(10).code, "timeout");
  assert.equal(new LlmTimeoutError(10).name, "LlmTimeoutError");
  assert.ok(new LlmTimeoutError(10) instanceof LlmError);
});
