"""report.md and PNG plots of a pyengine-train run."""
import json
import statistics
from pathlib import Path


def _load(path):
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _resumes(rows):
    """The steps a run resumed at (the step before the first row each resume wrote)."""
    return [r["step"] - 1 for r in rows if r.get("resumed")]


def _finish(fig, ax, path, title, xlabel="optimizer step", ylabel=None, legend_loc="best", resumes=()):
    import matplotlib.pyplot as plt

    for i, s in enumerate(resumes):
        ax.axvline(s, color="purple", ls=":", lw=1, label="resumed" if i == 0 else None)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc=legend_loc)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(out, rows, baseline_rows, summary):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    paths = {}
    steps = [r["step"] for r in rows]
    resumes = _resumes(rows)

    fig, ax = plt.subplots(figsize=(7, 4))
    base_label = (summary.get("baseline") or {}).get("label", "torch DDP")
    ax.plot(steps, [r["loss"] for r in rows], label="train loss (pyengine)", lw=1.5)
    if baseline_rows:  # dashed with markers: the curves may coincide
        ax.plot([r["step"] for r in baseline_rows], [r["loss"] for r in baseline_rows],
                label=f"train loss ({base_label})", lw=1, ls="--", marker="x", markevery=max(1, len(baseline_rows) // 20),
                alpha=0.8)
    if summary.get("val_loss") is not None and steps:
        ax.scatter([steps[-1]], [summary["val_loss"]], color="red", zorder=3, label="held-out loss")
    ax.axhline(summary["uniform_loss"], color="gray", ls="--", lw=1, label="uniform guess (ln 256)")
    paths["loss"] = _finish(fig, ax, out / "loss.png", "Loss", ylabel="loss (nats per byte)", resumes=resumes)

    if summary.get("precision") == "fp16":  # bf16 and fp32 use no loss scale
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(steps, [r["loss_scale"] for r in rows], lw=1, label="loss scale")
        skipped = [r["step"] for r in rows if r["skipped"]]
        if skipped:
            ax.scatter(skipped, [next(x["loss_scale"] for x in rows if x["step"] == s) for s in skipped], color="red",
                       marker="x", label=f"skipped steps ({len(skipped)})", zorder=3)
        ax.set_yscale("log", base=2)
        paths["loss_scale"] = _finish(fig, ax, out / "loss_scale.png", "Loss scale (fp16)",
                                      ylabel="loss scale (multiplier, log2 axis)", resumes=resumes)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [r["lr"] for r in rows], lw=1, label="learning rate (group 0)")
    paths["lr"] = _finish(fig, ax, out / "lr.png", "Learning rate", ylabel="learning rate (per step)",
                          resumes=resumes)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [r["grad_norm"] for r in rows], lw=1, label="global gradient norm (before clipping)")
    if summary.get("clip"):
        ax.axhline(summary["clip"], color="gray", ls="--", lw=1, label=f"clip at {summary['clip']:g}")
    paths["grad_norm"] = _finish(fig, ax, out / "grad_norm.png", "Gradient norm", ylabel="L2 norm (unscaled)",
                                 resumes=resumes)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    fb = [1e3 * r["fwd_bwd_s"] for r in rows]
    ex = [1e3 * r["exposed_comm_s"] for r in rows]
    op = [1e3 * r["optimizer_s"] for r in rows]
    ax.stackplot(steps, fb, ex, op, labels=["pyengine: forward + backward", "pyengine: exposed comm",
                                            "pyengine: optimizer"])
    if baseline_rows:
        ax.plot([r["step"] for r in baseline_rows], [1e3 * r["step_s"] for r in baseline_rows], color="black",
                lw=1, ls="--", label=f"{base_label}: whole step")
    paths["time"] = _finish(fig, ax, out / "step_time.png", "Step time (rank 0)", ylabel="time per step (ms)",
                            legend_loc="upper right", resumes=resumes)
    return paths


def write_report(out, args, summary):
    out = Path(out)
    rows = _load(out / "metrics.jsonl")
    base = summary.get("baseline") or {}
    base_rows = _load(out / "baseline_ddp.jsonl") if base else []
    paths = write_plots(out, rows, base_rows, {**summary, "precision": args.get("precision"), "clip": args.get("clip")})
    tail = rows[len(rows) // 10:] or rows  # skip warm-up in throughput figures
    med = lambda k: statistics.median(r[k] for r in tail) if tail else float("nan")
    tok_s = statistics.median(r["tokens_per_s"] for r in tail) if tail else float("nan")
    step_s = med("step_s")
    mem = summary["memory_per_param"]
    tflops = summary.get("flops_per_token", 0) * tok_s / 1e12 if tail else float("nan")
    peak = summary.get("peak_tflops_per_device")
    mfu = f"{tflops / (peak * summary['world_size']):.1%}" if peak else "n/a (peak of this device unknown)"
    lines = [
        "# pyengine-train report", "",
        f"Model **{args['model']}**, {summary['params'] / 1e6:.2f}M parameters; {summary['world_size']} rank(s) on "
        f"{args['device']}; precision {args['precision']}; {summary['steps_done']} of {args['steps']} steps"
        + (" (interrupted)" if summary["interrupted"] else "") + ".", "",
        _wall_line(summary), "",
        _data_line(summary.get("data")), "",
        *[f"Resumed at step {s}." for s in _resumes(rows)], "",
        "## Result", "",
        "| | nats per byte |", "| --- | --- |",
        f"| final train loss (last step) | {rows[-1]['loss']:.3f} |" if rows else "| final train loss | - |",
        f"| held-out loss | {summary['val_loss']:.3f} |",
        f"| uniform guess (ln 256) | {summary['uniform_loss']:.3f} |", "",
        "## Throughput and time per step (median, rank 0)", "",
        "| tokens/s (all ranks) | model TFLOP/s | MFU | step ms | forward+backward ms | exposed comm ms | optimizer ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {tok_s:,.0f} | {tflops:.2f} | {mfu} | {1e3 * step_s:.1f} | {1e3 * med('fwd_bwd_s'):.1f} | "
        f"{1e3 * med('exposed_comm_s'):.1f} | {1e3 * med('optimizer_s'):.1f} |", "",
        "Model TFLOP/s count 6 FLOPs per parameter and token plus attention's 12 x layers x sequence x width; "
        f"MFU holds them against the device's peak ({summary.get('device_name', '?')}).", "",
        f"Communication: {summary['comm']['collectives']} collectives, overlap fraction "
        f"{summary['comm']['overlap_fraction']:.0%} (exposed {summary['comm']['exposed_comm_s']:.2f} s of "
        f"{summary['comm']['comm_s']:.2f} s). Host-side timings: on a GPU they show launch time, not kernel time.", "",
        "## Memory per parameter (persistent, bytes)", "",
        "| " + " | ".join(mem) + " |", "|" + " --- |" * len(mem), "| " + " | ".join(str(v) for v in mem.values()) + " |",
        "",
        f"Skipped steps (non-finite gradients): {summary['skipped_steps']}; final loss scale {summary['loss_scale']:g}.",
        "",
        "## Plots", "",
        *[f"![{name.replace('_', ' ')}]({Path(p).name})\n" for name, p in paths.items()],
    ]
    if base:
        lines += [
            f"## Side by side: torch {base.get('label', 'DDP')}", "",
            ("Steps alternated with the engine's (engine step, DDP step, ...), so both ran under the same load."
             if base.get("interleaved") else "Trained after the engine's run (a resumed run), from step 0."), "",
            f"| | pyengine | torch {base.get('label', 'DDP')} |", "| --- | --- | --- |",
            f"| tokens/s | {tok_s:,.0f} | {base['tokens_per_s']:,.0f} |",
            f"| step ms (median) | {1e3 * step_s:.1f} | {1e3 * base['step_s']:.1f} |",
            f"| final train loss | {rows[-1]['loss']:.3f} | {base['final_loss']:.3f} |" if rows else "",
            f"| held-out loss | {summary['val_loss']:.3f} | {base['val_loss']:.3f} |",
            f"| bytes per parameter | {mem['total']} | {base['bytes_per_param']} |", "",
        ]
    lines += ["## Sample (generated from a held-out prompt)", "", "```", summary.get("sample", ""), "```", "",
              "## Configuration", "", "```json", json.dumps(args, indent=1), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _wall_line(summary) -> str:
    if "wall_s" not in summary:
        return ""
    line = f"Wall time: {summary['wall_s']:.1f} s"
    if summary.get("wall_s_total", summary["wall_s"]) > summary["wall_s"] + 0.05:
        line += f" this time, {summary['wall_s_total']:.1f} s over the run's invocations"
    return line + "."


def _data_line(data) -> str:
    if not data:
        return ""
    return (f"Data: {data['source']}, {data['files']} file(s), {data['corpus_bytes']:,} bytes; "
            f"{data['bytes_used']:,} bytes used (--max-data-mb {data['max_data_mb']:g}).")
