package bench

import (
	"testing"
)

func TestPercentile(t *testing.T) {
	hundred := make([]float64, 100)
	for i := range hundred {
		hundred[i] = float64(i + 1)
	}
	for _, tc := range []struct {
		name   string
		sorted []float64
		p      float64
		want   float64
	}{
		{"none", nil, 50, 0},
		{"one sample is every percentile", []float64{7}, 99, 7},
		{"median of an odd count is the middle", []float64{1, 2, 3}, 50, 2},
		{"median of an even count is the lower middle (nearest rank)", []float64{1, 2, 3, 4}, 50, 2},
		{"p90 of 1..100", hundred, 90, 90},
		{"p99 of 1..100", hundred, 99, 99},
		{"p100 is the max", hundred, 100, 100},
		{"p99 of 20 is the max", hundred[:20], 99, 20},
		{"p90 of 10 is the 9th", hundred[:10], 90, 9},
		{"a tiny p is the min", hundred, 0.1, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Percentile(tc.sorted, tc.p); got != tc.want {
				t.Errorf("Percentile(%v, %v) = %v, want %v", tc.sorted, tc.p, got, tc.want)
			}
		})
	}
}

func TestSummarizeSortsACopy(t *testing.T) {
	in := []float64{5, 1, 4, 2, 3}
	s := Summarize(in)
	if s != (Summary{N: 5, P50: 3, P90: 5, P99: 5, Max: 5}) {
		t.Errorf("Summarize(%v) = %+v", in, s)
	}
	if in[0] != 5 || in[1] != 1 {
		t.Errorf("Summarize reordered its input: %v", in)
	}
	if (Summarize(nil) != Summary{}) {
		t.Errorf("Summarize(nil) = %+v, want zero", Summarize(nil))
	}
}
