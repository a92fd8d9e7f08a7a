"""``fiberpo-theory figures``: draws the paper's Figures 2, 3 and 4 from :mod:`fiberpo_theory.tools.figure_data`.

The plot functions only draw the data they are given; all computing is in
the data module.  Matplotlib is used through :class:`matplotlib.figure.Figure`
only (no pyplot, no global backend switch), so rendering is headless.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from .figure_data import (
    DRIFT_SEED,
    GLOBAL_REGIMES,
    LOCAL_REGIMES,
    PAPER_ZOOM,
    BaseWeightMap,
    DriftData,
    GateCurves,
    SimplexMap,
    base_weight_map,
    drift_data,
    gate_curves,
    simplex_map,
)

__all__ = ["plot_figure2", "plot_figure3", "plot_figure4", "render_all", "FIGURE_NAMES", "add_arguments", "run"]

FIGURE_NAMES = ("fig2_base_weight", "fig3_simplex_regimes", "fig4_drift_objective")


# ---------------------------------------------------------------------------
# Plotting (draws the data, computes nothing of its own)
# ---------------------------------------------------------------------------

_RED, _BLUE, _TEAL, _PURPLE, _GRAY = "#d62728", "#1f5fbf", "#17a2a2", "#8e44ad", "#888888"
_GLOBAL_COLORS = ("#ffffff", "#f7c6a3", "#e8735a", "#b7d3ea", "#dddddd")
_LOCAL_COLORS = ("#c9f0e8", "#f3e3a5", "#e4c8f0")


def _figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _log_w_image(ax, data: BaseWeightMap, vmax=None):
    vmax = vmax or float(np.nanmax(np.abs(data.log_w)))
    extent = (data.log_s_pos[0], data.log_s_pos[-1], data.log_s_neg[0], data.log_s_neg[-1])
    return ax.imshow(
        data.log_w, origin="lower", extent=extent, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax,
        interpolation="nearest",
    )


def _channel_lines(ax, b: dict[str, float], *, alpha=1.0):
    ax.axvline(b["C+"], color=_BLUE, ls="--", lw=1.2, alpha=alpha, label=f"C⁺ = {b['C+']:.3g}")
    ax.axvline(b["C*+"], color=_BLUE, ls=":", lw=1.2, alpha=alpha, label=f"C*⁺ = {b['C*+']:.3g}")
    ax.axhline(b["C-"], color=_RED, ls="--", lw=1.2, alpha=alpha, label=f"C⁻ = {b['C-']:.3g}")
    ax.axhline(b["C*-"], color=_RED, ls=":", lw=1.2, alpha=alpha, label=f"C*⁻ = {b['C*-']:.3g}")


def plot_figure2(curves: GateCurves, bw: BaseWeightMap):
    """Figure 2: (a) g_agg for several k; (b) log w with regime boundaries."""
    fig = _figure(11.5, 4.6)
    ax_a, ax_b = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.25]})
    c = curves.c
    ax_a.axvspan(-c, c, color="#e8eefc", zorder=0)
    ax_a.plot(curves.x, curves.x, color=_GRAY, lw=0.8, ls="-", alpha=0.6, label="identity")
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for j, k in enumerate(curves.k_values):
        color = cmap(j / max(1, len(curves.k_values) - 1))
        ax_a.plot(curves.x, curves.values[j], color=color, lw=1.6, label=f"k = {k:g}")
    for s in (-1, 1):
        ax_a.axvline(s * c, color=_BLUE, ls="--", lw=0.9)
    ax_a.set_xlim(curves.x[0], curves.x[-1])
    ax_a.set_ylim(-1.6 * c, 1.6 * c)
    ax_a.set_xlabel("x (aggregate log-ratio log s)")
    ax_a.set_ylabel("g_agg(x, C, k)")
    ax_a.set_title(f"(a) g_agg (Eq. 10), C = {c:g}: pass-through, rollback (slope −k), zeroed", fontsize=9)
    ax_a.text(0, 1.45 * c, "pass-through |x| ≤ C", ha="center", fontsize=8, color=_BLUE)
    ax_a.legend(fontsize=8, loc="lower right")

    im = _log_w_image(ax_b, bw)
    _channel_lines(ax_b, bw.boundaries)
    for px, py, text in bw.labels:
        ax_b.text(px, py, text, ha="center", va="center", fontsize=8,
                  bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="0.6", alpha=0.85))
    ax_b.set_xlabel("P = log s⁺")
    ax_b.set_ylabel("N = log s⁻")
    ax_b.set_title(f"(b) log w_base (Eq. 8), k = {bw.k:g}, C⁺ = {bw.c_pos:g}, C⁻ = {bw.c_neg:g}", fontsize=9)
    ax_b.legend(fontsize=7, loc="upper right", framealpha=0.9)
    fig.colorbar(im, ax=ax_b, label="log w_base")
    return fig


def _masked(a, inside):
    return np.ma.array(a, mask=~inside)


def _simplex_frame(ax, m: SimplexMap, *, vertex_labels=True):
    tri = np.vstack([m.vertices, m.vertices[:1]])
    ax.plot(tri[:, 0], tri[:, 1], color="black", lw=1.0)
    if vertex_labels:
        for (vx, vy), name, va in zip(m.vertices, ("r₁ = 3", "r₂ = 3", "r₃ = 3"), ("top", "top", "bottom")):
            ax.text(vx, vy + (0.08 if va == "bottom" else -0.08), name, ha="center", va=va, fontsize=8)
    ax.plot([0], [0], marker="+", color="black", ms=9, mew=1.5)
    ax.set_xlim(m.vertices[:, 0].min() - 0.3, m.vertices[:, 0].max() + 0.3)
    ax.set_ylim(m.vertices[:, 1].min() - 0.3, m.vertices[:, 1].max() + 0.3)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def _regime_image(ax, m: SimplexMap, codes, colors):
    from matplotlib.colors import ListedColormap

    extent = (m.x[0], m.x[-1], m.y[0], m.y[-1])
    ax.imshow(_masked(codes, m.inside), origin="lower", extent=extent, cmap=ListedColormap(colors),
              vmin=-0.5, vmax=len(colors) - 0.5, interpolation="nearest")


def _contour(ax, m: SimplexMap, field_, level, **style):
    return ax.contour(m.x, m.y, _masked(field_, m.inside), levels=[level], **style)


def plot_figure3(local: SimplexMap, full: SimplexMap):
    """Figure 3 (our rendering): local regimes (zoomed), global regimes, and log w on the simplex."""
    fig = _figure(14.5, 5.0)
    ax_a, ax_b, ax_c = fig.subplots(1, 3)
    _local_regimes_panel(ax_a, local, full.boundaries)
    _global_regimes_panel(ax_b, full)
    _log_w_simplex_panel(fig, ax_c, full)
    fig.suptitle(
        f"Regimes of one T = 3 trajectory on the simplex (1/T)Σ r_t = 1  "
        f"(ε = {full.eps:g}, C⁺ = {full.c_pos:g}, C⁻ = {full.c_neg:g}, k = {full.k:g}, C*± = (1+1/k)C±)",
        fontsize=10)
    return fig


def _local_regimes_panel(ax_a, local: SimplexMap, b: dict[str, float]):
    """Panel (a): the local regimes near r = (1, 1, 1) with the ε and C± boundaries."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    _regime_image(ax_a, local, local.local_regime, _LOCAL_COLORS)
    _contour(ax_a, local, local.max_abs_u, local.eps, colors=_TEAL, linewidths=1.6)
    _contour(ax_a, local, local.min_abs_u, local.eps, colors=_PURPLE, linewidths=1.6)
    _contour(ax_a, local, local.log_s_neg, b["C-"], colors=_RED, linestyles="--", linewidths=1.2)
    _contour(ax_a, local, local.log_s_pos, b["C+"], colors=_BLUE, linestyles="--", linewidths=1.2)
    ax_a.plot([0], [0], marker="+", color="black", ms=10, mew=1.5)
    half = float(local.x[-1] - local.x.mean())
    for px, py, text in local.labels:
        ax_a.annotate(text, (px, py), xytext=(px + 0.45 * half, py + 0.12 * half), ha="center", fontsize=9,
                      fontweight="bold",
                      arrowprops=dict(arrowstyle="->", lw=0.8),
                      bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="0.7", alpha=0.9))
    ax_a.set_aspect("equal")
    ax_a.set_xlabel("plane coordinate (ratio units)")
    ax_a.set_title(f"(a) local regimes, zoom ±{half / 3:.2f} in p = r/3 around r = (1,1,1)", fontsize=9)
    ax_a.legend(
        handles=[Patch(color=c, label=n) for c, n in zip(_LOCAL_COLORS, LOCAL_REGIMES)]
        + [Line2D([], [], color=_TEAL, label="L-I/L-II: max|uᵢ| = ε"),
           Line2D([], [], color=_PURPLE, label="L-II/L-III: min|uᵢ| = ε"),
           Line2D([], [], color=_RED, ls="--", label=f"N = C⁻ = {b['C-']:g}"),
           Line2D([], [], color=_BLUE, ls="--", label=f"P = C⁺ = {b['C+']:g}")],
        fontsize=7, loc="lower left", framealpha=0.9)


def _global_regimes_panel(ax_b, full: SimplexMap):
    """Panel (b): the global regimes on the whole simplex with the C± and C*± boundaries."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    b = full.boundaries
    _regime_image(ax_b, full, full.global_regime, _GLOBAL_COLORS)
    _simplex_frame(ax_b, full)
    _contour(ax_b, full, full.log_s_neg, b["C-"], colors=_RED, linewidths=1.3)
    _contour(ax_b, full, full.log_s_neg, b["C*-"], colors=_RED, linestyles=":", linewidths=1.3)
    _contour(ax_b, full, full.log_s_pos, b["C+"], colors=_BLUE, linewidths=1.3)
    _contour(ax_b, full, full.log_s_pos, b["C*+"], colors=_BLUE, linestyles=":", linewidths=1.3)
    for i, (px, py, text) in enumerate(full.labels):
        ax_b.annotate(text, (px, py), xytext=(0.75 + 0.1 * (i % 2), -0.25 - 0.22 * i), ha="left", fontsize=8,
                      fontweight="bold", arrowprops=dict(arrowstyle="->", lw=0.7),
                      bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="0.7", alpha=0.9))
    ax_b.set_title("(b) global regimes G-I … G-III (Sec. 5.1)", fontsize=9)
    ax_b.legend(
        handles=[Patch(color=c, label=n, ec="0.7") for c, n in zip(_GLOBAL_COLORS, GLOBAL_REGIMES)]
        + [Line2D([], [], color=_RED, label=f"N = C⁻ = {b['C-']:g}"),
           Line2D([], [], color=_RED, ls=":", label=f"N = C*⁻ = {b['C*-']:.3g}"),
           Line2D([], [], color=_BLUE, label=f"P = C⁺ = {b['C+']:g}"),
           Line2D([], [], color=_BLUE, ls=":", label=f"P = C*⁺ = {b['C*+']:.3g}")],
        fontsize=7, loc="upper left", framealpha=0.9)


def _log_w_simplex_panel(fig, ax_c, full: SimplexMap):
    """Panel (c): log w on the simplex with the L-I boundary and the C± lines."""
    b = full.boundaries
    vmax = float(np.nanmax(np.abs(full.log_w)))
    extent = (full.x[0], full.x[-1], full.y[0], full.y[-1])
    im = ax_c.imshow(_masked(full.log_w, full.inside), origin="lower", extent=extent, cmap="RdBu_r",
                     vmin=-vmax, vmax=vmax, interpolation="nearest")
    _simplex_frame(ax_c, full)
    _contour(ax_c, full, full.log_s_neg, b["C-"], colors=_RED, linewidths=1.0)
    _contour(ax_c, full, full.log_s_pos, b["C+"], colors=_BLUE, linewidths=1.0)
    _contour(ax_c, full, full.max_abs_u, full.eps, colors=_TEAL, linewidths=1.0)
    ax_c.set_title("(c) log w_base with the L-I boundary (teal) and N = C⁻, P = C⁺", fontsize=9)
    fig.colorbar(im, ax=ax_c, label="log w_base", shrink=0.8)




_MARKER_STYLE = {
    "eps-token": dict(color=_GRAY, ls="-", lw=0.5, alpha=0.45),
    "eps": dict(color="#444444", ls="--", lw=1.2),
    "C-": dict(color=_RED, ls="-", lw=1.0),
    "C*-": dict(color=_RED, ls=":", lw=1.0),
    "C+": dict(color=_BLUE, ls="-", lw=1.0),
    "C*+": dict(color=_BLUE, ls=":", lw=1.0),
}


def _markers(ax, d: DriftData):
    for m in d.markers:
        ax.axvline(m.t, **_MARKER_STYLE[m.kind], zorder=0)


def plot_figure4(d: DriftData):
    """Figure 4: (a) path over log w, (b) fiber correction at t_bar, (c) per-token, (d) total objective."""
    fig = _figure(12.0, 9.0)
    (ax_a, ax_b), (ax_c, ax_d) = fig.subplots(2, 2)
    _drift_path_panel(fig, ax_a, d)
    _fiber_correction_panel(ax_b, d)
    _token_objective_panel(ax_c, d)
    _total_objective_panel(ax_d, d)
    fig.suptitle(
        f"Per-token and total objective under r_i = 1 + tΔ_i  (T = {d.delta.size}, k = {d.k:g}, ε = {d.eps:g}, "
        f"C⁺ = {d.c_pos:g}, C⁻ = {d.c_neg:g}, sign Δ_i = sign Â_i, seed {DRIFT_SEED})",
        fontsize=10)
    return fig


def _drift_path_panel(fig, ax_a, d: DriftData):
    """Panel (a): the drift path r = 1 + tΔ drawn over the log w map, with integer t marked."""
    b = d.heatmap.boundaries
    im = _log_w_image(ax_a, d.heatmap)
    _channel_lines(ax_a, b, alpha=0.8)
    inside = (d.log_s_pos <= d.heatmap.log_s_pos[-1]) & (d.log_s_neg <= d.heatmap.log_s_neg[-1])
    pos_side, neg_side = d.t >= 0, d.t <= 0
    ax_a.plot(d.log_s_pos[inside & pos_side], d.log_s_neg[inside & pos_side], color="black", lw=1.6, label="t ≥ 0")
    ax_a.plot(d.log_s_pos[inside & neg_side], d.log_s_neg[inside & neg_side], color="black", lw=1.4, ls="--",
              label="t ≤ 0")
    for ti in range(int(math.ceil(d.t[0])), int(math.floor(d.t[-1])) + 1):
        j = int(np.argmin(np.abs(d.t - ti)))
        if inside[j]:
            ax_a.plot(d.log_s_pos[j], d.log_s_neg[j], "o", color="black", ms=3.5)
            ax_a.annotate(f"{ti:+d}" if ti else "t=0", (d.log_s_pos[j], d.log_s_neg[j]), xytext=(4, -3),
                          textcoords="offset points", fontsize=7)
    ax_a.set_xlabel("P = log s⁺")
    ax_a.set_ylabel("N = log s⁻")
    ax_a.set_title(f"(a) log w_base and the drift path (k = {d.k:g})", fontsize=9)
    ax_a.legend(fontsize=7, loc="upper right", framealpha=0.9)
    fig.colorbar(im, ax=ax_a, label="log w_base")


def _fiber_correction_panel(ax_b, d: DriftData):
    """Panel (b): each token's log-ratio and its two log-space corrections at t = t_bar."""
    idx = np.arange(d.delta.size)
    wdt = 0.38
    ax_b.bar(idx - wdt / 2, d.bar_log_ratio, wdt, color="#9db8e8", label="raw log rᵢ")
    ax_b.bar(idx + wdt / 2, d.bar_numerator, wdt, color=_RED, alpha=0.75, label="clip(lᵢuᵢ, ε)  (fiber residual)")
    ax_b.bar(idx + wdt / 2, d.bar_base_minus_denominator, wdt, bottom=d.bar_numerator, color="#f39c4a", alpha=0.75,
             label="log w − clip(lᵢvᵢ, ε)  (base weight)")
    ax_b.scatter(idx + wdt / 2, d.bar_log_gated, marker="_", s=160, color="black", zorder=3,
                 label="log G(r)ᵢ = log(w·r̃ᵢ)")
    ax_b.axhline(0, color="black", lw=0.6)
    ax_b.set_xticks(idx)
    ax_b.set_xlabel("token index i")
    ax_b.set_ylabel("log-space correction")
    ax_b.set_title(f"(b) per-token fiber correction at t = {d.t_bar:g}", fontsize=9)
    ax_b.legend(fontsize=7, loc="best")


def _token_objective_panel(ax_c, d: DriftData):
    """Panel (c): two tokens' objective along the path, FiberPO against GRPO."""
    colors = (_RED, _BLUE)
    for c, i in zip(colors, d.tokens):
        ax_c.plot(d.t, d.fiberpo_token[:, i], color=c, lw=1.6, label=f"FiberPO token {i}: Δ = {d.delta[i]:+.3f}")
        ax_c.plot(d.t, d.grpo_token[:, i], color=c, lw=0.9, ls="--", alpha=0.7, label=f"GRPO token {i}")
    _markers(ax_c, d)
    ax_c.axvline(0, color="black", lw=0.8)
    ax_c.set_xlabel("t")
    ax_c.set_ylabel("G(r)ᵢ · Âᵢ")
    ax_c.set_title("(c) per-token objective, FiberPO vs GRPO", fontsize=9)
    ax_c.legend(fontsize=7, loc="best")


def _total_objective_panel(ax_d, d: DriftData):
    """Panel (d): the total objective along the path, with the regime changes marked."""
    from matplotlib.lines import Line2D

    ax_d.plot(d.t, d.fiberpo_total, color=_BLUE, lw=1.8, label="FiberPO")
    ax_d.plot(d.t, d.grpo_total, color="0.35", lw=1.2, ls="--", label="GRPO (same ε)")
    ax_d.plot(d.t, d.unweighted_total, color="#2ca02c", lw=0.9, ls="-.", label="FiberPO with w_base = 1")
    _markers(ax_d, d)
    ax_d.axvline(0, color="black", lw=0.8)
    ax_d.set_xlabel("t")
    ax_d.set_ylabel("Ĵ = Σᵢ μᵢ G(r)ᵢ Âᵢ")
    ax_d.set_title("(d) total objective (Eq. 18)", fontsize=9)
    handles, _ = ax_d.get_legend_handles_labels()
    handles += [Line2D([], [], **_MARKER_STYLE["eps"], label="L-I→L-II (max|uᵢ| = ε)"),
                Line2D([], [], **_MARKER_STYLE["eps-token"], label="token reaches |uᵢ| = ε"),
                Line2D([], [], **_MARKER_STYLE["C-"], label="N = C⁻ (rollback)"),
                Line2D([], [], **_MARKER_STYLE["C*-"], label="N = C*⁻ (zeroed)"),
                Line2D([], [], **_MARKER_STYLE["C+"], label="P = C⁺ (rollback)"),
                Line2D([], [], **_MARKER_STYLE["C*+"], label="P = C*⁺ (zeroed)")]
    ax_d.legend(handles=handles, fontsize=7, loc="best", ncol=2)




# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def render_all(out_dir, *, dpi: int = 150, resolution: int = 401, console=None) -> list[Path]:
    """Compute and save the three figures as PNG and PDF in ``out_dir``; return the paths."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = (
        (FIGURE_NAMES[0], lambda: plot_figure2(gate_curves(), base_weight_map(num=resolution))),
        (FIGURE_NAMES[1], lambda: plot_figure3(simplex_map(half_width=PAPER_ZOOM * 3, num=resolution),
                                               simplex_map(num=resolution))),
        (FIGURE_NAMES[2], lambda: plot_figure4(drift_data(heatmap_num=max(101, resolution * 3 // 4)))),
    )
    written: list[Path] = []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("figures", total=3 * len(jobs))
        for name, build in jobs:
            progress.update(task, description=f"{name}: computing")
            fig = build()
            progress.advance(task)
            for ext in ("png", "pdf"):
                progress.update(task, description=f"{name}: writing {ext}")
                path = out / f"{name}.{ext}"
                fig.savefig(path, dpi=dpi)
                written.append(path)
                progress.advance(task)
        progress.update(task, description="figures: done")
    return written


MIN_RESOLUTION = 3  # the smallest heatmap grid with a point inside the T = 3 simplex
MAX_RESOLUTION = 2001  # memory grows as resolution²: measured 2.6 GB peak and 31 s for all figures at 2001
MAX_DPI = 1200  # the widest figure (14.5 in) is then 17400 px; matplotlib refuses 65536 px and more


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli_types import int_in_range, output_dir

    parser.add_argument("--out", type=output_dir, default="figures", help="output directory, created if missing (default: %(default)s)")
    parser.add_argument("--dpi", type=int_in_range(1, MAX_DPI), default=150,
                        help=f"PNG resolution in dots per inch, 1 to {MAX_DPI} (default: %(default)s)")
    parser.add_argument("--resolution", type=int_in_range(MIN_RESOLUTION, MAX_RESOLUTION), default=401,
                        help=f"grid points per axis of the heatmaps, {MIN_RESOLUTION} to {MAX_RESOLUTION} (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    paths = render_all(args.out, dpi=args.dpi, resolution=args.resolution, console=console)
    for path in paths:
        console.print(f"wrote {path}")
    return 0
