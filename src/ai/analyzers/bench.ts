/**
 * Throughput measurement for embedded analyzers: items per second on one core.
 *
 * @module
 */

import process from "node:process";
import { sentimentAnalyzer } from "./sentiment.ts";
import { topicsAnalyzer } from "./topics.ts";
import { toxicityAnalyzer } from "./toxicity.ts";

/** Anything with a name and a synchronous `analyze`. */
export interface SyncAnalyzer {
  /** Stable name. */
  readonly name: string;
  /** Analyzes one text synchronously. */
  analyze(text: string): unknown;
}

/** Throughput of one analyzer. */
export interface Throughput {
  /** The analyzer's name. */
  analyzer: string;
  /** Texts analyzed while timing. */
  items: number;
  /** Wall time spent, in milliseconds. */
  millis: number;
  /** Items per second of wall time. */
  itemsPerSecond: number;
  /** CPU time (user + system) the process spent while timing, in milliseconds. */
  cpuMillis: number;
  /**
   * Items per second of CPU time: what one core does when it is not shared. On a busy
   * machine wall time also counts the time other processes held the core, so this is the
   * steadier figure.
   */
  itemsPerCpuSecond: number;
}

/** Options for {@link benchAnalyzer} and {@link benchAnalyzers}. */
export interface BenchOptions {
  /** Keep passing over the texts until at least this many milliseconds. Default 300. */
  minMillis?: number;
  /** Passes over the texts before timing, to warm the JIT. Default 1. */
  warmupPasses?: number;
}

/**
 * Measures how many texts per second one analyzer handles.
 *
 * @example
 * ```ts
 * benchAnalyzer(sentimentAnalyzer(), ["great app", "it crashes"]).itemsPerSecond;
 * ```
 */
export function benchAnalyzer(
  analyzer: SyncAnalyzer,
  texts: readonly string[],
  options: BenchOptions = {},
): Throughput {
  const minMillis = options.minMillis ?? 300;
  const warmup = options.warmupPasses ?? 1;
  if (texts.length === 0) {
    return {
      analyzer: analyzer.name,
      items: 0,
      millis: 0,
      itemsPerSecond: 0,
      cpuMillis: 0,
      itemsPerCpuSecond: 0,
    };
  }
  for (let p = 0; p < warmup; p++) for (const t of texts) analyzer.analyze(t);
  let items = 0;
  const cpuStart = process.cpuUsage();
  const start = performance.now();
  let millis = 0;
  do {
    for (const t of texts) analyzer.analyze(t);
    items += texts.length;
    millis = performance.now() - start;
  } while (millis < minMillis);
  const cpu = process.cpuUsage(cpuStart);
  const cpuMillis = (cpu.user + cpu.system) / 1000;
  return {
    analyzer: analyzer.name,
    items,
    millis,
    itemsPerSecond: (items * 1000) / millis,
    cpuMillis,
    itemsPerCpuSecond: cpuMillis > 0 ? (items * 1000) / cpuMillis : 0,
  };
}

/**
 * Measures the three default embedded analyzers (sentiment, topics, toxicity) on a list
 * of texts. The project's bench task calls this.
 *
 * @example
 * ```ts
 * for (const r of benchAnalyzers(["slow app", "please add dark mode"])) {
 *   r.analyzer; r.itemsPerSecond;
 * }
 * ```
 */
export function benchAnalyzers(texts: readonly string[], options: BenchOptions = {}): Throughput[] {
  return [sentimentAnalyzer(), topicsAnalyzer(), toxicityAnalyzer()].map((a) =>
    benchAnalyzer(a, texts, options)
  );
}
