"""A run's counts: per stage and reason, bytes in and out, time per stage; and the table printed at the end."""

from __future__ import annotations

from collections import Counter

from data_pipeline.curation.document import StageStats


def merge_stage_stats(markers: list[dict], rows: dict[str, StageStats]) -> None:
    """Add each task marker's stage stats to `rows`, keeping stage order."""
    for marker in markers:
        for name, data in marker["stages"].items():
            rows.setdefault(name, StageStats(name)).add(StageStats.from_dict(name, data))


def build_stats(inputs: list[str], filtered: list[dict], written: list[dict], dedup_seconds: float,
                seconds: float) -> dict:
    """The run's stats from its task markers; checks that every document read was kept or removed."""
    read = sum(f["read"] for f in filtered)
    unreadable = sum(f["unreadable"] for f in filtered)
    stages: dict[str, StageStats] = {}
    merge_stage_stats(filtered, stages)
    merge_stage_stats(written, stages)
    for name in ("exact_dedup", "minhash_dedup"):  # the global step between the phases is dedup's too
        if name in stages:
            stages[name].seconds += dedup_seconds
            dedup_seconds = 0.0
    reasons: Counter = Counter()
    for f in filtered:  # markers written before reasons were counted give the total alone
        reasons.update(f.get("unreadable_reasons", {"input:unreadable": f["unreadable"]}))
    rows = {"input": {"seen": read, "kept": read - unreadable, "dropped": dict(sorted((+reasons).items())), "seconds": 0}}
    rows.update({name: stat.to_dict() for name, stat in stages.items()})
    kept = sum(w["kept"] for w in written)
    removed = sum(f["removed"] for f in filtered) + sum(w["removed"] for w in written)
    if kept + removed != read:
        raise RuntimeError(f"curation lost documents: read {read}, kept {kept}, removed {removed}")
    return {"inputs": len(inputs), "read": read, "kept": kept, "removed": removed,
            "bytes_in": sum(f["bytes_in"] for f in filtered), "bytes_out": sum(w["bytes_out"] for w in written),
            "seconds": round(seconds, 3), "stages": rows}


def summary_table(stats: dict) -> str:
    lines = [f"{'stage':<20}{'kept':>12}{'dropped':>12}{'dropped %':>11}{'seconds':>10}"]
    for name, row in stats["stages"].items():
        dropped = sum(row["dropped"].values())
        share = 100 * dropped / row["seen"] if row["seen"] else 0.0
        lines.append(f"{name:<20}{row['kept']:>12,}{dropped:>12,}{share:>10.1f}%{row['seconds']:>10.1f}")
    lines.append(f"{'total':<20}{stats['kept']:>12,}{stats['removed']:>12,}"
                 f"{100 * stats['removed'] / max(stats['read'], 1):>10.1f}%{stats['seconds']:>10.1f}")
    return "\n".join(lines)
