/**
 * The parts of prom-client Weft uses (Registry, Counter, Gauge, Histogram, and the
 * AggregatorRegistry's `aggregate`), loaded from their own modules and typed by the package's
 * declarations. prom-client's index also loads its Pushgateway (node:http, node:https), its
 * cluster support and its default metrics (OpenTelemetry's API among them), none of which Weft
 * uses: about 70 ms of CPU at the start of every process that imports it (measured: 0.13-0.15
 * CPU-s to import the index, 0.07 for these modules), and the supervisor, every service and
 * every command-line task import it.
 *
 * @example
 * ```ts
 * import * as client from "./prom.ts";
 * const registry = new client.Registry();
 * const seen = new client.Counter({ name: "seen_total", help: "Seen", registers: [registry] });
 * seen.inc();
 * console.assert((await registry.getSingleMetric("seen_total")?.get())?.values[0]?.value === 1);
 * ```
 *
 * @module
 */
import type * as Prom from "prom-client";
// Deep imports of CommonJS files: their types come from the package's index declarations.
import RegistryModule from "prom-client/lib/registry.js";
import CounterModule from "prom-client/lib/counter.js";
import GaugeModule from "prom-client/lib/gauge.js";
import HistogramModule from "prom-client/lib/histogram.js";
import ClusterModule from "prom-client/lib/cluster.js";

/** prom-client's Registry. */
export const Registry: typeof Prom.Registry = RegistryModule;
/** prom-client's Registry. */
export type Registry = Prom.Registry;
/** prom-client's Counter. */
export const Counter: typeof Prom.Counter = CounterModule;
/** prom-client's Counter. */
export type Counter<T extends string = string> = Prom.Counter<T>;
/** prom-client's Gauge. */
export const Gauge: typeof Prom.Gauge = GaugeModule;
/** prom-client's Gauge. */
export type Gauge<T extends string = string> = Prom.Gauge<T>;
/** prom-client's Histogram. */
export const Histogram: typeof Prom.Histogram = HistogramModule;
/** prom-client's Histogram. */
export type Histogram<T extends string = string> = Prom.Histogram<T>;
/** prom-client's AggregatorRegistry (for its static `aggregate`; no cluster is used). */
export const AggregatorRegistry: typeof Prom.AggregatorRegistry = ClusterModule;
/** prom-client's global registry. */
export const register: Prom.Registry = (RegistryModule as typeof Prom.Registry & {
  globalRegistry: Prom.Registry;
}).globalRegistry;
