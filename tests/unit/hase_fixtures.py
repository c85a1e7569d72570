"""A tiny Hase study folder for tests: four known facts of two relations and the study file beside them."""

from __future__ import annotations

import json
from pathlib import Path

FACTS = [("Paris", "R1", "France"), ("Rome", "R1", "Italy"), ("Tokyo", "R2", "Japan"), ("Lima", "R2", "Peru")]


def four_fact_study(folder: Path, study_yaml: str):
    """facts.jsonl (FACTS) and study.yaml (`study_yaml`, which names facts.jsonl) in `folder`; the loaded HaseSpec."""
    from locaudit.study.hase.spec import load_hase_spec

    recs = [{"id": str(i), "subject": s, "prompt": f"{s} is a city in", "target": obj, "relation_id": rel}
            for i, (s, rel, obj) in enumerate(FACTS)]
    (folder / "facts.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (folder / "study.yaml").write_text(study_yaml)
    return load_hase_spec(folder / "study.yaml")
