"""How ``par-deploy bench`` shows a result: the progress bar, the tables, the plots."""

from __future__ import annotations

from pathlib import Path

from par_deploy.bench import roofline


class ProgressBar:
    """A rich progress bar per stage (nothing when disabled)."""

    def __init__(self, enabled: bool):
        self.p = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.p = Progress(TextColumn("bench {task.description}"), BarColumn(), MofNCompleteColumn())
            self.p.start()
        self.task = None

    def stage(self, name: str, total: int) -> None:
        if self.p:
            self.task = self.p.add_task(name, total=total)

    def advance(self, _round: int = 0) -> None:
        if self.p and self.task is not None:
            self.p.advance(self.task)

    def close(self) -> None:
        if self.p:
            self.p.stop()


def print_report(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cfg = result["config"]
    t = Table(
        title=f"control step at {cfg['history_point']} blocks of history (ms; {cfg['sampler']} "
        f"K={cfg['denoise_steps']}, train schedule {cfg['train_timesteps']} steps)"
    )
    for col in ("case", "p50", "p90", "p99", "min"):
        t.add_column(col, justify="right" if col != "case" else "left")
    for name, s in result["components_ms"].items():
        t.add_row(name, *(f"{s[k]:.2f}" for k in ("p50", "p90", "p99", "min")))
    console.print(t)
    if "roofline" in result:
        roofline.print_roofline(result["roofline"], console)
    r = Table(title="ratios (one run)")
    r.add_column("ratio")
    r.add_column("value", justify="right")
    r.add_column("target")
    for name, value in result["ratios"].items():
        tgt = result["targets"].get(name)
        mark = "" if not tgt else f"{tgt['target']} {'met' if tgt['met'] else 'MISSED'}"
        r.add_row(name, f"{value:.2f}", mark)
    console.print(r)
    if result["memory"]:
        m = result["memory"]
        console.print(
            f"peak RSS: engine process {m['engine']['peak_rss_mb']:.0f} MB (torch imported: "
            f"{m['engine']['imported_torch']}), reference process {m['reference']['peak_rss_mb']:.0f} MB; "
            f"cold load {m['engine']['load_s']:.2f} s vs {m['reference']['load_s']:.2f} s"
        )


def plot_result(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
    for name, curve in result["history_ms"].items():
        xs = sorted(int(h) for h in curve)
        a.plot(xs, [curve[str(x)]["p50"] for x in xs], marker="o", label=name)
    a.set_xlabel("history (blocks in the cache)")
    a.set_ylabel("control step p50 (ms)")
    a.set_title("cost vs history")
    a.legend()
    for name, curve in result["k_ms"].items():
        xs = sorted(int(k) for k in curve)
        if xs:
            b.plot(xs, [curve[str(x)]["p50"] for x in xs], marker="o", label=name)
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("denoising steps K")
    b.set_ylabel("control step p50 (ms)")
    b.set_title("cost vs K")
    b.legend()
    if "roofline" in result:
        roofline.plot_roofline(c, result["roofline"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
