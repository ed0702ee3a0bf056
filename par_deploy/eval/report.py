"""What the user sees: a progress bar while a run goes, then one table of every run (and their difference)."""

from __future__ import annotations

from typing import Any

from par_deploy.eval.episode import EpisodeRecord
from par_deploy.eval.results import EvalResult, RunBook
from par_deploy.eval.rollouts import InlineRollouts, ProcessPoolRollouts, Rollouts, RolloutSetup


def run_with_progress(
    setup: RolloutSetup, book: RunBook, workers: int, timeout: float, max_retries: int, console, progress: bool
) -> None:
    """Run the book's remaining jobs on ``workers`` processes (0: this one), recording each, with a progress bar."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    def running() -> str:
        recs = book.records()
        k = sum(r.success_once for r in recs)
        return f"success_once {k}/{len(recs)}" + (f" ({100 * k / len(recs):.0f}%)" if recs else "")

    columns = (
        TextColumn(f"{setup.task} {book.label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not progress) as bar:
        bar_id = bar.add_task(book.label, total=book.total, completed=book.total - len(book.todo), rate=running())

        def on_record(record: EpisodeRecord) -> None:
            book.add(record)
            bar.update(bar_id, advance=1, rate=running())
            if record.error:
                console.log(f"{book.label} state {record.state} seed {record.policy_seed}: {record.error}")

        if not book.todo:
            return
        rollouts: Rollouts = (
            InlineRollouts(setup)
            if workers == 0
            else ProcessPoolRollouts(setup, workers, timeout, max_retries, log=console.log)
        )
        try:
            rollouts.run(book.todo, on_record)
        finally:
            rollouts.close()


def _pct(rate: dict[str, Any] | None, key: str = "ci95") -> str:
    if not rate or rate.get(key) is None:
        return "-"
    lo, hi = rate[key]
    if key != "ci95":
        return f"[{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"{100 * rate['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({rate['successes']}/{rate['n']})"


def _clustered(rate: dict[str, Any] | None) -> str:
    if not rate:
        return "-"
    return f"{_pct(rate, 'ci95_bootstrap')} / {_pct(rate, 'ci95_states')} ({rate['states']} states)"


def _stats(d: dict[str, float] | None) -> str:
    return f"{d['mean']:.1f} / {d['min']:.0f} / {d['max']:.0f}" if d else "-"


def _errors(s: dict[str, Any]) -> str:
    text = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "-"
    return text + (f" (retried {s['retried']})" if s["retried"] else "")


def _diff(c: dict[str, Any] | None, metric: str) -> list[str]:
    if not c:
        return []
    m = c[metric]
    if not m:
        return ["-"]
    lo, hi = m["ci95_unpaired"]
    return [f"{100 * m['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] ({m['only_a']}/{m['only_b']})"]


def _table(result: EvalResult):
    from rich.table import Table

    p, runs, c = result.protocol, list(result.runs.values()), result.compare
    table = Table(
        title=f"{result.task}: {p['max_steps']} steps, seeds {p['policy_seeds']}, initial states from "
        f"seed {p['state_seed_base']}, {p['control_mode']}"
    )
    table.add_column("")
    for run in runs:
        table.add_column(
            f"{run.label}\n{run.policy['kind']}, {run.policy['sampler']}-{run.policy['steps']}", justify="right"
        )
    blank = [""] if c else []
    if c:
        table.add_column(f"{c['a']} - {c['b']}", justify="right")
        table.caption = (
            f"difference in points [95% CI, Newcombe, unpaired] (episodes only {c['a']} / only {c['b']} succeeded)"
        )
    sums = [r.summary for r in runs]
    table.add_row("episodes", *[str(s["episodes"]) for s in sums], *([str(c["paired_episodes"])] if c else []))
    table.add_row(
        "success_once [95% CI over rollouts]", *[_pct(s["success_once"]) for s in sums], *_diff(c, "success_once")
    )
    table.add_row("  95% CI over states: bootstrap / Wilson", *[_clustered(s["success_once"]) for s in sums], *blank)
    table.add_row(
        "success_at_end [95% CI over rollouts]", *[_pct(s["success_at_end"]) for s in sums], *_diff(c, "success_at_end")
    )
    table.add_row("  95% CI over states: bootstrap / Wilson", *[_clustered(s["success_at_end"]) for s in sums], *blank)
    table.add_row("first success step mean/min/max", *[_stats(s["success_step"]) for s in sums], *blank)
    table.add_row("length mean/min/max", *[_stats(s["length"]) for s in sums], *blank)
    table.add_row(
        "act ms p50 / p90",
        *[
            f"{s['act_ms']['p50']:.1f} / {s['act_ms']['p90']:.1f}" if s["act_ms"]["p50"] is not None else "-"
            for s in sums
        ],
        *blank,
    )
    table.add_row("errors", *[_errors(s) for s in sums], *blank)
    table.add_row("wall s", *[f"{r.wall_seconds:.0f}" for r in runs], *blank)
    if c and c["first_chunk_max_abs_diff"] is not None:
        table.add_row(
            "first chunk max |diff|",
            *["" for _ in runs],
            f"{c['first_chunk_max_abs_diff']:.2e} ({c['first_chunk_compared']} ep.)",
        )
    return table


def print_report(result: EvalResult, console=None) -> None:
    """A table of every run (a column each; with a comparison, the difference) on the terminal."""
    from rich.console import Console

    console = console or Console()
    if result.policy_note:
        console.print(result.policy_note)
    console.print(_table(result))
    c = result.compare
    if c and c["first_chunk_compared"] and c["first_obs_identical"] != c["first_chunk_compared"]:
        console.print(
            f"[yellow]warning:[/] only {c['first_obs_identical']} of {c['first_chunk_compared']} episodes "
            "started from bit-identical observations in both runs; the chunk difference mixes in the "
            "simulator's"
        )
    if result.json_path:
        console.print(f"results: {result.json_path}")
