/**
 * Sample feedback texts for the shadow tests, benchmark and screenshots: a mix the
 * reference rules route to different teams with different sentiments. Each user takes the
 * first N, so their figures stay those of the same items.
 *
 * @module
 */

/** Fifteen feedback texts; callers take a prefix. */
export const SAMPLE_FEEDBACK: readonly string[] = [
  "I love the new dashboard, great work",
  "The app crashes every time I open settings, please fix",
  "I was charged twice this month, refund me",
  "Could you add a dark mode?",
  "Cannot log in since yesterday, password reset does not work",
  "Everything is slow today, pages take ages to load",
  "Thanks, the support team was lovely",
  "Your invoice is wrong again, terrible",
  "The export button does nothing",
  "Not bad, but the search could be faster",
  "Awful experience, nobody answered my ticket",
  "Where can I change my email address?",
  "Great update, though the sync is broken on Android",
  "Please add an option to export to PDF",
  "The new pricing is fair, thank you",
];
