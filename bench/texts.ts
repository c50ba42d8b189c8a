/**
 * The feedback texts every side of the benchmarks submits, in turn: the same for the bare
 * pipeline, Weft (bus- and HTTP-fed, `bench/http_load.ts`) and BullMQ, so their figures
 * are for the same work.
 *
 * @module
 */

/** Eight short feedback texts of the kinds the analyzers sort. */
export const BENCH_TEXTS: readonly string[] = [
  "The checkout keeps failing with a card error, this is really frustrating",
  "Love the new dashboard, it is fast and the charts are great",
  "Shipping took two weeks and nobody answered my emails",
  "The app crashes every time I open settings on Android",
  "Pricing is fair but the invoice layout is confusing",
  "Support resolved my login problem in minutes, thank you!",
  "Search results are slow and often irrelevant",
  "Please add dark mode, my eyes hurt at night",
];
