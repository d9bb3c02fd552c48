package bench

import (
	"math"
	"slices"
)

// Summary is the distribution of one measurement, in the samples' unit
// (milliseconds for times).
type Summary struct {
	N                  int
	P50, P90, P99, Max float64
}

// Summarize sorts a copy of samples and takes nearest-rank percentiles: the
// p-th percentile is the smallest sample with at least p% of the samples at
// or below it, so every reported value was measured.
func Summarize(samples []float64) Summary {
	s := slices.Clone(samples)
	slices.Sort(s)
	if len(s) == 0 {
		return Summary{}
	}
	return Summary{N: len(s), P50: Percentile(s, 50), P90: Percentile(s, 90), P99: Percentile(s, 99), Max: s[len(s)-1]}
}

// Percentile is the nearest-rank p-th percentile (0 < p ≤ 100) of sorted
// samples; 0 when there are none.
func Percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// Median is the 50th percentile of unsorted samples.
func Median(samples []float64) float64 { return Summarize(samples).P50 }
