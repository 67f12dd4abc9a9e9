"""REPORT.md's certify-or-predict section (beyond the paper, issue 22): each composed run (the
compose stage, `certify/compose.py`; read by `collect.collect_compositions`) beside the run alone
and the reference run of its seed, the controls in the guide's place, and the paired differences
composite − reference over the seeds."""
from __future__ import annotations

from .tables import fmt, fmt_signed, paired_verdict

CONTROL_LABELS = {"vanilla_control": "another vanilla model", "untrained": "an untrained network"}


def _row(composition: dict) -> str:
    chosen, alone, reference = composition["chosen"], composition["certified_model_alone"], \
        composition["reference_result"]
    test = chosen["test"]
    controls = " / ".join(fmt(composition["controls_at_chosen_tau"][name]["clean_accuracy"])
                          for name in composition["controls_at_chosen_tau"]) or "—"
    tau = f"{chosen['tau_over_eps']:g}" + ("" if chosen["meets_reference"] else " (misses)")
    return (f"| {composition['method']} | {tau} | "
            f"{fmt(alone['clean_accuracy'])} / {fmt(alone['certified_accuracy'])} | "
            f"{fmt(test['clean_accuracy'])} / {fmt(composition['attack']['robust_accuracy'])} / "
            f"{fmt(test['certified_accuracy'])} / {fmt(test['certified_accuracy_2eps'])} | "
            f"{fmt(test['certified_model_answers'], 1)} | "
            f"{reference.name}: {fmt(reference.certify['clean_accuracy'])} / "
            f"{fmt(reference.attack['pgd_accuracy'])} / {fmt(reference.certify['headline_certified_accuracy'])} | "
            f"{controls} |")


def composition_section(compositions: list[dict]) -> list[str]:
    """The section's lines; none without composed runs."""
    if not compositions:
        return []
    controls = list(compositions[0]["controls_at_chosen_tau"])
    control_text = " / ".join(CONTROL_LABELS[name] for name in controls) or "none"
    lines = ["## Certify or predict: a certified run composed with the vanilla guide (beyond the paper)", "",
             "f(x) = the certified run's answer where its GloRo radius is at least τ, the vanilla guide's "
             "elsewhere; certified where the run is GloRo-certified at ε + τ (`bounds/selection.py`, "
             "docs/methods.md). τ chosen on the validation split: the best validation clean accuracy whose "
             "validation certified accuracy is at least the reference run's minus "
             f"{fmt(compositions[0]['reference']['certified_slack'], 1)} points ('misses': no τ of the grid "
             "reaches it; the most certified τ). Test split, %. Attacked: the composite's accuracy under its "
             "own three l2 PGD attacks at ε (its radius, the guide, both; `certify/compose_attack.py`), at the "
             "chosen τ; every certified point was attacked and none was handed to the guide or broken. The "
             "reference's PGD column is the pgd stage's (PGD and APGD on one network): not the same attacks, "
             "so no paired difference is read from the two.", "",
             f"| run | τ / ε | run alone: clean / certified | composite: clean / attacked / certified / at 2ε | "
             f"run answers | reference: clean / PGD / certified | clean with {control_text} as guide |",
             "| --- | ---: | --- | --- | ---: | --- | --- |"]
    lines += [_row(c) for c in compositions]
    lines += [""]
    by_group: dict[str, list[dict]] = {}
    for composition in compositions:
        by_group.setdefault(composition["group"], []).append(composition)
    for group, members in by_group.items():
        reference_group = members[0]["reference_result"].group
        differences = {
            "clean": [c["chosen"]["test"]["clean_accuracy"] - c["reference_result"].certify["clean_accuracy"]
                      for c in members],
            "certified": [c["chosen"]["test"]["certified_accuracy"]
                          - c["reference_result"].certify["headline_certified_accuracy"] for c in members],
        }
        lines.append(f"- {members[0]['label']} composed − {reference_group}, paired by seed "
                     f"(n = {len(members)}; mean [95 % t-interval]): "
                     + "; ".join(f"{name} {paired_verdict(values)}" for name, values in differences.items()) + ".")
        own = [c["chosen"]["test"]["clean_accuracy"] - c["certified_model_alone"]["clean_accuracy"] for c in members]
        lines.append(f"- What the guide adds to {members[0]['label']} alone: clean {fmt_signed(sum(own) / len(own))} "
                     "points on average; the controls' column says how much of that any accurate model, or none, "
                     "would give.")
    return lines + [""]
