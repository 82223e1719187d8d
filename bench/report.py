"""The engine benchmark's report: the markdown table and the issue's targets."""

from __future__ import annotations

import torch

from .timing import Row

PAPER_TABLE2 = {  # A100, 512², 4 steps, stream batch: ms per frame, GiB (nvidia-smi)
    "none": (60, 3.68), "queue1": (70, 4.03), "queue2": (79, 4.17), "queue4": (100, 4.77), "dyme1": (75, 4.07),
}



def fmt(value, pattern="{:.1f}", none="n/a") -> str:
    return none if value is None else pattern.format(value)


def _spread(values: list[float] | None, pattern: str = "{:.3f}") -> str:
    """'median (min–max)' or n/a."""
    if values is None:
        return "n/a"
    median, low, high = (pattern.format(v) for v in values)
    return f"{median} ({low}–{high})"


CLOCKS = {
    "wall": "wall time, the device synchronised before and after",
    "cpu": "this process's CPU time (one thread: the frame's work, without the time spent waiting for a core)",
}


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# StreamV2V Canvas benchmark",
        "",
        f"{env['device_name']} · model {env['model']} · {env['size']}×{env['size']} · {env['dtype']} · "
        f"{env['accel']}",
        "",
    ]
    if env.get("builtin_note"):
        lines += [env["builtin_note"], ""]
    groups: dict[tuple, list[dict]] = {}
    for row in result["rows"]:
        groups.setdefault((row["steps"], row["mode"]), []).append(row)
    first = result["rows"][0] if result["rows"] else None
    for (steps, mode), rows in groups.items():
        lines += [
            f"## {steps}-step LCM, {'stream batch' if mode == 'stream' else 'latency mode'}",
            "",
            "| row | ms per frame: median (min–max) | fps | time / no bank | time / peer | memory (GiB) | "
            "bank (MiB) | memory / no bank |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in rows:
            lines.append(
                f"| {row['label']} | {_spread([row['ms'], row['ms_min'], row['ms_max']], '{:.1f}')} | "
                f"{row['fps']:.2f} | {_spread(row['ratio_time'])} | {_spread(row['ratio_peer'])} | "
                f"{fmt(row['memory_gib'], '{:.3f}')} | {row['bank_mib']:.1f} | {fmt(row['ratio_memory'], '{:.3f}')} |"
            )
        lines.append("")
    if first is not None:
        lines += [
            f"Timing: every row warmed up alone, then {first['rounds']} rounds of {first['block']} frames per row "
            "in rotating order, each row with its own stream; a row's figure per round is the median frame time "
            "of its block; the table gives the median over rounds and (min–max). Time ratios are taken round by "
            "round against the no-bank row's or the peer's block of the same round: median (min–max). "
            f"Frame time: {CLOCKS.get(env.get('clock'), 'wall time')}. Memory: {first['memory_kind']}.",
            "",
        ]
    load = env.get("load_average")
    if load:
        lines += [f"Load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f} "
                  f"on {env.get('cpu_count')} CPUs; {env.get('threads')} torch threads.", ""]
    if result.get("peer_note"):
        lines += [f"Peer: {result['peer_note']}", ""]
    if result.get("targets"):
        lines += ["## Targets (issue 4: H100, 512², 4 steps, DyMe, stream batch)", "",
                  "| target | value: median (min–max) | met |", "| --- | ---: | --- |"]
        for target in result["targets"]:
            met = {True: "yes", False: "no", None: "n/a"}[target["met"]]
            value = target["value"]
            text = _spread(value) if isinstance(value, list) else fmt(value, "{:.3f}")
            lines.append(f"| {target['name']} | {text} | {met} |")
        lines.append("")
    for profile in result.get("profiles", []):
        lines += [f"## Profile: {profile['label']}, {profile['steps']}-step, {profile['mode']} "
                  f"({profile['frames']} frames, device synchronised around each stage)", "",
                  "| stage | ms per frame | calls per frame | ms per call |", "| --- | ---: | ---: | ---: |"]
        for name, ms in profile["ms_per_frame"].items():
            calls = profile["calls_per_frame"].get(name)
            per_call = profile["ms_per_call"].get(name)
            lines.append(f"| {name} | {ms:.2f} | {fmt(calls, '{:.2f}', '')} | {fmt(per_call, '{:.2f}', '')} |")
        lines.append("")
    lines += ["Command: `" + result["command"] + "`", ""]
    return "\n".join(lines)


def targets(rows: list[Row], device: torch.device) -> list[dict]:
    find = lambda key: next((r for r in rows if r.key == key and r.steps == 4 and r.mode == "stream"), None)  # noqa: E731
    none, dyme, peer = find("none"), find("dyme1"), find("peer")
    on_gpu = device.type == "cuda"
    out = []

    def add(name, value, ok):
        out.append({"name": name, "value": value, "met": ok if on_gpu else None})

    if dyme:
        add("DyMe fps ≥ 60", dyme.fps, dyme.fps >= 60)
    if dyme and none:
        add("DyMe / no-bank time ≤ 1.10", dyme.ratio_time, dyme.ratio_time[0] <= 1.10)
        if dyme.ratio_memory is not None:
            add("DyMe / no-bank memory ≤ 1.10", dyme.ratio_memory, dyme.ratio_memory <= 1.10)
    if none and peer:
        add("our no-bank / peer no-bank time ≤ 1.00", none.ratio_peer, none.ratio_peer[0] <= 1.0)
    if dyme and peer:
        add("our DyMe / peer no-bank time ≤ 1.10", dyme.ratio_peer, dyme.ratio_peer[0] <= 1.10)
    return out
