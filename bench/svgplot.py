"""bench/svgplot.py: line charts as SVG, drawn by hand with the standard library only.

bench/report.py draws every plot of the benchmark report with line_chart(); placeholder() draws
the frame of a plot whose benchmark did not run, with the reason in it. A chart has a title,
both axes with ticks and tick labels, axis labels, grid lines, one polyline per series with a
marker per point (hovering a marker shows its value), an error bar per point that has a
spread (the min and max of the runs behind a best-of-N point), and a legend. The x axis is linear or
base-2 logarithmic (thread counts, sizes: ticks at the data's x values); the y axis linear from
0 or base-10 logarithmic. The SVG is plain SVG 1.1 with no scripts or external references.

Structure the tests rely on: each series is a <g class="series" data-name=NAME> holding one
<polyline> per unbroken run of points, one <circle> per point and one <line class="error-bar">
per point with a spread (plus its two caps, class "error-cap"); the texts carry the classes
"title", "x-label", "y-label", "x-tick", "y-tick", "legend" and "note".
"""

import math
from xml.sax.saxutils import escape, quoteattr

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#17becf", "#bcbd22"]
DASHES = ["", "7,4", "2,3", "9,3,2,3"]
FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'
CHAR_W = 7.0  # average width of a 12 px character, for layout


class Series:
    """One line: `points` is a list of (x, y); y None breaks the line there (no marker).
    `errors`, when given, holds one (low, high) per point, or None for a point without a spread:
    drawn as a vertical bar from low to high through the point (e.g. the min and max of the runs
    a best-of-N point was taken from)."""

    def __init__(self, name, points, color=None, dash=None, errors=None):
        self.name = name
        self.points = [(float(x), None if y is None else float(y)) for x, y in points]
        self.color = color
        self.dash = dash
        if errors is not None and len(errors) != len(self.points):
            raise ValueError("Series %r: %d error bars for %d points" % (name, len(errors),
                                                                         len(self.points)))
        self.errors = [None if e is None else (float(e[0]), float(e[1]))
                       for e in (errors or [None] * len(self.points))]


def si(v):
    """A short tick label: 1.2M, 350k, 12, 0.5, 2.5m."""
    if v == 0:
        return "0"
    a = abs(v)
    if 0.01 <= a < 1:
        return "%.3g" % v
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""), (1e-3, "m"), (1e-6, "u")):
        if a >= div * 0.9999:
            s = "%.3g" % (v / div)
            return s + suffix
    return "%.3g" % v


def nice_step(span, target=5):
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def linear_ticks(lo, hi):
    if hi <= lo:
        hi = lo + (abs(lo) or 1)
    step = nice_step(hi - lo)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t < hi + step * 0.999:
        ticks.append(round(t, 12))
        t += step
    return ticks


def log10_ticks(lo, hi):
    """Decades covering [lo, hi]; with fewer than two decades inside, 2x and 5x as well."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if b == a:
        b += 1
    ticks = [10.0 ** k for k in range(a, b + 1)]
    if b - a <= 2:
        ticks = sorted(t * m for t in ticks for m in (1, 2, 5) if t * m <= 10.0 ** b)
    return ticks


def _fmt(v):
    return ("%.1f" % v).rstrip("0").rstrip(".")


def line_chart(title, x_label, y_label, series, log_x=False, log_y=False, x_ticks=None,
               note=None, mark_x=None, width=760, height=420, x_tick_labels=None):
    """Returns the SVG text of a line chart of `series` (a list of Series).

    x_tick_labels: {x: text} labels some ticks otherwise than their value (e.g. the 0-worker
    point of a log axis, drawn at x=0.5 and labelled "0").
    mark_x: (x, label) draws a labelled vertical line there (e.g. the machine's core count), when
    x lies inside the axis.
    log_x: base-2 x axis (ticks at `x_ticks`, default every x in the data); log_y: base-10 y axis
    (every y must be > 0). Raises ValueError for no points, or values a log axis cannot show."""
    pts = [(x, y) for s in series for x, y in s.points if y is not None]
    if not pts:
        raise ValueError("line_chart %r: no points to plot" % title)
    # the error bars' ends count as points for the axes' ranges
    pts += [(x, v) for s in series for (x, y), e in zip(s.points, s.errors)
            if y is not None and e is not None for v in e]
    if log_x and any(x <= 0 for x, _ in pts):
        raise ValueError("line_chart %r: a log x axis needs x > 0" % title)
    if log_y and any(y <= 0 for _, y in pts):
        raise ValueError("line_chart %r: a log y axis needs y > 0 (use a linear axis)" % title)
    xs = sorted({x for x, _ in pts})
    ys = [y for _, y in pts]

    # -- layout: plot area on the left, legend on the right --------------------------------------
    legend_w = 40 + CHAR_W * max(len(s.name) for s in series)
    left, top, bottom = 78, 44, 62 + (18 if note else 0)
    plot_w = max(360, width - left - legend_w - 20)
    width = int(left + plot_w + legend_w + 20)
    plot_h = height - top - bottom
    height = int(height)

    # -- scales ----------------------------------------------------------------------------------
    if log_x:
        fx = math.log2
        xt = sorted(set(x_ticks or xs))
        x0, x1 = fx(min(xt[0], xs[0])), fx(max(xt[-1], xs[-1]))
    else:
        fx = float
        xt = x_ticks or linear_ticks(min(xs), max(xs))
        x0, x1 = min(xt[0], xs[0]), max(xt[-1], xs[-1])
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if log_y:
        fy = math.log10
        yt = log10_ticks(min(ys), max(ys))
    else:
        fy = float
        yt = linear_ticks(0.0, max(ys) if max(ys) > 0 else 1.0)
    y0, y1 = fy(yt[0]), fy(yt[-1])
    pad = 0.04 * plot_w  # keep end markers off the frame

    def px(x):
        return left + pad + (fx(x) - x0) / (x1 - x0) * (plot_w - 2 * pad)

    def py(y):
        return top + plot_h - (fy(y) - y0) / (y1 - y0) * plot_h

    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           '<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="%d" height="%d" '
           'viewBox="0 0 %d %d" %s font-size="12">' % (width, height, width, height, FONT),
           '<rect width="100%" height="100%" fill="white"/>',
           '<text class="title" x="%s" y="24" font-size="15" font-weight="bold">%s</text>'
           % (left, escape(title))]
    # -- grid, ticks, frame ----------------------------------------------------------------------
    out.append('<g class="axes" stroke="#000" stroke-width="1">')
    for t in yt:
        y = py(t)
        out.append('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="#ddd"/>'
                   % (_fmt(left), _fmt(y), _fmt(left + plot_w), _fmt(y)))
        out.append('<line x1="%s" y1="%s" x2="%s" y2="%s"/>' % (_fmt(left - 5), _fmt(y), _fmt(left), _fmt(y)))
    for t in xt:
        x = px(t)
        out.append('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="#eee"/>'
                   % (_fmt(x), _fmt(top), _fmt(x), _fmt(top + plot_h)))
        out.append('<line x1="%s" y1="%s" x2="%s" y2="%s"/>'
                   % (_fmt(x), _fmt(top + plot_h), _fmt(x), _fmt(top + plot_h + 5)))
    out.append('<rect x="%s" y="%s" width="%s" height="%s" fill="none"/>'
               % (left, top, _fmt(plot_w), _fmt(plot_h)))
    out.append('</g>')
    if mark_x is not None:
        mx, mlabel = mark_x
        if (mx > 0 or not log_x) and x0 <= fx(mx) <= x1:
            x = px(mx)
            out.append('<line class="mark" x1="%s" y1="%s" x2="%s" y2="%s" stroke="#888" '
                       'stroke-dasharray="3,3"/>' % (_fmt(x), _fmt(top), _fmt(x), _fmt(top + plot_h)))
            out.append('<text class="mark-label" x="%s" y="%s" fill="#666" font-size="11">%s</text>'
                       % (_fmt(x + 4), _fmt(top + 13), escape(mlabel)))
    for t in yt:
        out.append('<text class="y-tick" x="%s" y="%s" text-anchor="end">%s</text>'
                   % (_fmt(left - 8), _fmt(py(t) + 4), escape(si(t))))
    for t in xt:
        out.append('<text class="x-tick" x="%s" y="%s" text-anchor="middle">%s</text>'
                   % (_fmt(px(t)), _fmt(top + plot_h + 19),
                      escape((x_tick_labels or {}).get(t, si(t)))))
    out.append('<text class="x-label" x="%s" y="%s" text-anchor="middle">%s%s</text>'
               % (_fmt(left + plot_w / 2), _fmt(top + plot_h + 40), escape(x_label),
                  " (log scale)" if log_x else ""))
    cy = top + plot_h / 2
    out.append('<text class="y-label" x="18" y="%s" text-anchor="middle" '
               'transform="rotate(-90 18 %s)">%s%s</text>'
               % (_fmt(cy), _fmt(cy), escape(y_label), " (log scale)" if log_y else ""))
    if note:
        out.append('<text class="note" x="%s" y="%s" fill="#555" font-size="11">%s</text>'
                   % (left, height - 10, escape(note)))
    # -- the series ------------------------------------------------------------------------------
    lx = left + plot_w + 20
    for i, s in enumerate(series):
        color = s.color or PALETTE[i % len(PALETTE)]
        dash = s.dash if s.dash is not None else ""
        dash_attr = ' stroke-dasharray="%s"' % dash if dash else ""
        out.append('<g class="series" data-name=%s>' % quoteattr(s.name))
        run = []
        for x, y in s.points + [(None, None)]:
            if y is None:
                if len(run) > 1:
                    out.append('<polyline fill="none" stroke="%s" stroke-width="2"%s points="%s"/>'
                               % (color, dash_attr, " ".join("%s,%s" % (_fmt(a), _fmt(b)) for a, b in run)))
                run = []
            else:
                run.append((px(x), py(y)))
        for (x, y), e in zip(s.points, s.errors):
            if y is None or e is None:
                continue
            ex, lo, hi = px(x), py(e[0]), py(e[1])
            out.append('<line class="error-bar" x1="%s" y1="%s" x2="%s" y2="%s" stroke="%s" '
                       'stroke-width="1.2"/>' % (_fmt(ex), _fmt(lo), _fmt(ex), _fmt(hi), color))
            for yy in (lo, hi):
                out.append('<line class="error-cap" x1="%s" y1="%s" x2="%s" y2="%s" stroke="%s" '
                           'stroke-width="1.2"/>' % (_fmt(ex - 4), _fmt(yy), _fmt(ex + 4),
                                                     _fmt(yy), color))
        for (x, y), e in zip(s.points, s.errors):
            if y is not None:
                out.append('<circle cx="%s" cy="%s" r="3.5" fill="%s"><title>%s</title></circle>'
                           % (_fmt(px(x)), _fmt(py(y)), color,
                              escape("%s: x=%s, y=%.4g%s" % (
                                  s.name, (x_tick_labels or {}).get(x, si(x)), y, "" if e is None else
                                  " (runs %.4g-%.4g)" % e))))
        out.append('</g>')
        ly = top + 8 + 20 * i
        out.append('<g class="legend-entry"><line x1="%s" y1="%s" x2="%s" y2="%s" stroke="%s" '
                   'stroke-width="2"%s/><circle cx="%s" cy="%s" r="3.5" fill="%s"/>'
                   '<text class="legend" x="%s" y="%s">%s</text></g>'
                   % (_fmt(lx), _fmt(ly), _fmt(lx + 28), _fmt(ly), color, dash_attr,
                      _fmt(lx + 14), _fmt(ly), color, _fmt(lx + 34), _fmt(ly + 4), escape(s.name)))
    out.append('</svg>')
    return "\n".join(out) + "\n"


def placeholder(title, lines, width=760, height=240):
    """Returns the SVG of an empty plot frame titled `title` with `lines` of text in it (why the
    plot is missing)."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           '<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="%d" height="%d" '
           'viewBox="0 0 %d %d" %s font-size="13">' % (width, height, width, height, FONT),
           '<rect width="100%" height="100%" fill="white"/>',
           '<text class="title" x="20" y="28" font-size="15" font-weight="bold">%s</text>'
           % escape(title),
           '<rect x="20" y="44" width="%d" height="%d" fill="#f6f6f6" stroke="#999" '
           'stroke-dasharray="6,4"/>' % (width - 40, height - 64)]
    y0 = 44 + (height - 64) / 2 - 10 * (len(lines) - 1)
    for i, line in enumerate(lines):
        out.append('<text class="note" x="%d" y="%s" text-anchor="middle" fill="#444">%s</text>'
                   % (width // 2, _fmt(y0 + 20 * i + 5), escape(line)))
    out.append('</svg>')
    return "\n".join(out) + "\n"
