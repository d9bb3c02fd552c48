package bench

import (
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"io"
	"math"
	"slices"
	"strconv"
)

// Plot size and the plot area's margins, in pixels.
const (
	plotWidth, plotHeight                            = 900, 540
	marginLeft, marginRight, marginTop, marginBottom = 90, 30, 60, 70
)

// Series is one distribution in a plot.
type Series struct {
	Label  string
	Color  color.RGBA
	Values []float64
}

// Mark is a vertical dashed line at X (a target or a floor).
type Mark struct {
	Label string
	Color color.RGBA
	X     float64
}

var (
	white    = color.RGBA{255, 255, 255, 255}
	black    = color.RGBA{0, 0, 0, 255}
	gridGray = color.RGBA{225, 225, 225, 255}
	blue     = color.RGBA{31, 119, 180, 255}
	orange   = color.RGBA{255, 127, 14, 255}
	gray     = color.RGBA{110, 110, 110, 255}
	red      = color.RGBA{214, 39, 40, 255}
	green    = color.RGBA{44, 160, 44, 255}
	purple   = color.RGBA{148, 103, 189, 255}
)

// PlotCDF draws the cumulative distributions of series (x: the values, y:
// the fraction of samples at or below) with marks, axes, ticks, labels and a
// legend, as a PNG of plotWidth × plotHeight.
func PlotCDF(w io.Writer, title, xLabel string, series []Series, marks []Mark) error {
	img := image.NewRGBA(image.Rect(0, 0, plotWidth, plotHeight))
	draw.Draw(img, img.Bounds(), &image.Uniform{white}, image.Point{}, draw.Src)

	lo, hi := math.Inf(1), 0.0
	for _, s := range series {
		for _, v := range s.Values {
			lo, hi = min(lo, v), max(hi, v)
		}
	}
	for _, m := range marks {
		lo, hi = min(lo, m.X), max(hi, m.X)
	}
	if hi <= 0 {
		lo, hi = 0, 1
	}
	x0, y0 := marginLeft, plotHeight-marginBottom // the origin
	x1, y1 := plotWidth-marginRight, marginTop
	// A linear axis from 0, or a logarithmic one when the values span more
	// than a decade (a burst's tail would squash the serial times).
	var ticks []float64
	var px func(float64) int
	if lo > 0 && hi/lo > 10 {
		// From the 1-2-5 step at or below lo to the one at or above hi.
		var steps []float64
		for e := math.Floor(math.Log10(lo)); e <= math.Ceil(math.Log10(hi)); e++ {
			for _, m := range []float64{1, 2, 5} {
				steps = append(steps, m*math.Pow(10, e))
			}
		}
		steps = append(steps, math.Pow(10, math.Ceil(math.Log10(hi))+1))
		for i, v := range steps {
			if v <= lo && (i+1 == len(steps) || steps[i+1] > lo) || len(ticks) > 0 {
				ticks = append(ticks, v)
			}
			if v >= hi && len(ticks) > 0 {
				break
			}
		}
		a, b := math.Log10(ticks[0]), math.Log10(ticks[len(ticks)-1])
		px = func(v float64) int {
			f := (math.Log10(max(v, ticks[0])) - a) / (b - a)
			return x0 + int(math.Round(f*float64(x1-x0)))
		}
		xLabel += " (log scale)"
	} else {
		step := niceStep(hi / 6)
		xMax := math.Ceil(hi*1.02/step) * step
		for v := 0.0; v <= xMax+step/2; v += step {
			ticks = append(ticks, v)
		}
		px = func(v float64) int { return x0 + int(math.Round(v/xMax*float64(x1-x0))) }
	}
	py := func(f float64) int { return y0 - int(math.Round(f*float64(y0-y1))) }

	// Grid, ticks and tick labels.
	for _, v := range ticks {
		x := px(v)
		vline(img, x, y1, y0, gridGray)
		vline(img, x, y0, y0+6, black)
		label := strconv.FormatFloat(v, 'f', -1, 64)
		drawText(img, x-textWidth(label)/2, y0+12, label, black)
	}
	for _, f := range []float64{0, 0.25, 0.5, 0.75, 1} {
		y := py(f)
		hline(img, x0, x1, y, gridGray)
		hline(img, x0-6, x0, y, black)
		label := strconv.FormatFloat(f, 'f', -1, 64)
		drawText(img, x0-10-textWidth(label), y-textHeight/2, label, black)
	}
	// Axes.
	hline(img, x0, x1, y0, black)
	vline(img, x0, y1, y0, black)
	drawText(img, (x0+x1-textWidth(xLabel))/2, y0+40, xLabel, black)
	yLabel := "fraction <= x"
	drawTextUp(img, 18, (y0+y1+textWidth(yLabel))/2, yLabel, black)
	drawText(img, (plotWidth-textWidth(title))/2, 20, title, black)

	for _, m := range marks {
		x := px(m.X)
		for y := y1; y < y0; y += 12 {
			vline(img, x, y, min(y+6, y0), m.Color)
			vline(img, x+1, y, min(y+6, y0), m.Color)
		}
	}
	for _, s := range series {
		v := slices.Clone(s.Values)
		slices.Sort(v)
		n := float64(len(v))
		prevX, prevY := x0, py(0)
		for i, val := range v {
			x := px(val)
			line(img, prevX, prevY, x, prevY, s.Color)
			y := py(float64(i+1) / n)
			line(img, x, prevY, x, y, s.Color)
			prevX, prevY = x, y
		}
		line(img, prevX, prevY, x1, prevY, s.Color)
	}

	// Legend, bottom right inside the plot area.
	var labels []string
	for _, s := range series {
		labels = append(labels, fmt.Sprintf("%s (n=%d)", s.Label, len(s.Values)))
	}
	for _, m := range marks {
		labels = append(labels, m.Label)
	}
	width := 0
	for _, l := range labels {
		width = max(width, textWidth(l))
	}
	lx, ly := x1-width-52, y0-16-len(labels)*(textHeight+8)
	fill(img, lx-8, ly-8, width+52, len(labels)*(textHeight+8)+8, white)
	box := image.Rect(lx-8, ly-8, x1-4, y0-16)
	hline(img, box.Min.X, box.Max.X, box.Min.Y, gray)
	hline(img, box.Min.X, box.Max.X, box.Max.Y, gray)
	vline(img, box.Min.X, box.Min.Y, box.Max.Y, gray)
	vline(img, box.Max.X, box.Min.Y, box.Max.Y, gray)
	for _, s := range series {
		fill(img, lx, ly+2, 24, textHeight-4, s.Color)
		drawText(img, lx+32, ly, fmt.Sprintf("%s (n=%d)", s.Label, len(s.Values)), black)
		ly += textHeight + 8
	}
	for _, m := range marks {
		fill(img, lx, ly+textHeight/2-1, 8, 3, m.Color)
		fill(img, lx+14, ly+textHeight/2-1, 8, 3, m.Color)
		drawText(img, lx+32, ly, m.Label, black)
		ly += textHeight + 8
	}
	return png.Encode(w, img)
}

// niceStep is the smallest of 1, 2 or 5 × a power of ten at least raw.
func niceStep(raw float64) float64 {
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*mag >= raw {
			return m * mag
		}
	}
	return 10 * mag
}

func hline(img *image.RGBA, xa, xb, y int, c color.Color) {
	for x := xa; x <= xb; x++ {
		img.Set(x, y, c)
	}
}

func vline(img *image.RGBA, x, ya, yb int, c color.Color) {
	for y := min(ya, yb); y <= max(ya, yb); y++ {
		img.Set(x, y, c)
	}
}

func fill(img *image.RGBA, x, y, w, h int, c color.Color) {
	draw.Draw(img, image.Rect(x, y, x+w, y+h), &image.Uniform{c}, image.Point{}, draw.Src)
}

// line draws a 2-pixel-wide horizontal or vertical segment (the CDF's steps).
func line(img *image.RGBA, xa, ya, xb, yb int, c color.Color) {
	fill(img, min(xa, xb), min(ya, yb)-1, abs(xb-xa)+2, abs(yb-ya)+2, c)
}

func abs(v int) int {
	if v < 0 {
		return -v
	}
	return v
}

// PlotTTI draws the TTI distributions (serial and burst) beside the raw
// restore floor and the miss target.
func (r *Results) PlotTTI(w io.Writer) error {
	var series []Series
	var marks []Mark
	if s := r.SDK; s != nil {
		series = append(series,
			Series{Label: "TTI serial, pool miss", Color: blue, Values: s.TTI.Serial},
			Series{Label: "TTI serial, pool hit", Color: purple, Values: s.TTI.Hit},
			Series{Label: fmt.Sprintf("TTI burst of %d", r.Counts.Burst), Color: orange, Values: s.TTI.Burst},
		)
		marks = append(marks,
			Mark{Label: "target (miss): 1.3 x restore + first echo", Color: red, X: missTarget(Median(r.RestoreFloor), Median(r.FirstCommand))},
			Mark{Label: "target: burst p90 <= 3 x serial p50", Color: green, X: burstFactor * Median(s.TTI.Serial)},
		)
	}
	series = append(series, Series{Label: "floor: raw clone restore", Color: gray, Values: r.RestoreFloor})
	title := fmt.Sprintf("warren time to interactive, %s, %s", r.Machine.Accel, r.Started.Format("2006-01-02"))
	return PlotCDF(w, title, "milliseconds", series, marks)
}
