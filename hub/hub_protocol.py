"""What the Hub client (hf.py) and the Hub server (hub_server/) agree on: names, routes, revisions, model cards.

Both sides import this module and never each other. A loraflow hub serves registry name NAME as the repo
`loraflow/NAME`; revision `main` is NAME's live version, `vN` is version N, and each user alias is a branch.
The model card's metadata carries a `loraflow` block (trainer, hyperparameters, metrics, lineage) that the
server and `loraflow pull` read back.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from loraflow.hub.base import BaseModel

NAMESPACE = "loraflow"
HEALTH_ROUTE = "/api/loraflow/health"
REGISTRY_ROUTE = "/api/loraflow/registry"
LIVE_BRANCH = "main"
VERSION_BRANCH = re.compile(r"^v(\d+)$")


def repo_id(name: str) -> str:
    return f"{NAMESPACE}/{name}"


def version_branch(number: int) -> str:
    return f"v{number}"


def version_of_branch(revision: str) -> int | None:
    """N for a revision `vN`, else None."""
    match = VERSION_BRANCH.match(revision)
    return int(match.group(1)) if match else None


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}{% if version %} (v{{ version }}){% endif %}

A LoRA adapter for [{{ base_id }}](https://huggingface.co/{{ base_id }}), trained with the loraflow
`{{ trainer.name }}` trainer{% if trainer.package %} ({{ trainer.package }} {{ trainer.version }}){% endif %}.

## Lineage
{% if lineage %}{% for ref in lineage %}{{ ref }}{% if not loop.last %} → {% endif %}{% endfor %}
{% elif parent %}Continues from `{{ parent }}`.
{% else %}Trained from the base model.
{% endif %}
## Data
{% for key, value in data_summary.items() %}- {{ key }}: {{ value }}
{% endfor %}
## Hyperparameters
{% for key, value in config.items() %}- {{ key }}: {{ value }}
{% endfor %}
## Metrics
{% for key, value in metrics.items() %}- {{ key }}: {{ value }}
{% endfor %}
{% if loss_curve %}## Loss curve

![loss curve]({{ loss_curve }})
{% endif %}
## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{{ base_id }}"), "{{ location }}"\
{% if revision %}, revision="{{ revision }}"{% endif %})
```
"""


def build_adapter_card(
    adapter_dir: Path,
    *,
    name: str,
    base: BaseModel | dict,
    trainer: dict,
    config: dict,
    metrics: dict,
    parent: str | None,
    data_summary: dict,
    version: int | None = None,
    lineage: list[str] | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """The card's metadata carries base_model, library_name and tags for the Hub, and a `loraflow` block
    (trainer, hyperparameters, metrics, lineage) that `loraflow pull` and the hub server read back."""
    from huggingface_hub import ModelCard, ModelCardData

    base_id = base["hub_id"] if isinstance(base, dict) else base.hub_id
    metrics = {key: round(value, 4) if isinstance(value, float) else value for key, value in metrics.items()}
    method = trainer.get("name", "lora")
    card_data = ModelCardData(
        base_model=base_id,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(["loraflow", "lora", method])),
        model_name=name,
        loraflow={
            "name": name,
            "version": version,
            "trainer": trainer,
            "parent": parent,
            "lineage": lineage or ([parent] if parent else []),
            "hyperparameters": config,
            "data": data_summary,
            "metrics": metrics,
        },
    )
    loss_curve = "loss_curve.png" if (Path(adapter_dir) / "loss_curve.png").is_file() else None
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        name=name,
        version=version,
        base_id=base_id,
        trainer=trainer,
        parent=parent,
        lineage=lineage,
        data_summary=data_summary,
        config=config,
        metrics=metrics,
        loss_curve=loss_curve,
        location=repo_id or f"path/to/{name}",
        revision=version_branch(version) if repo_id and version else None,
    )


def write_adapter_card(adapter_dir: Path, **details) -> Path:
    """Write README.md (the model card) into the adapter folder."""
    path = Path(adapter_dir) / "README.md"
    build_adapter_card(adapter_dir, **details).save(path)
    return path


def card_metadata(folder: Path) -> dict:
    """The `loraflow` block of the folder's model card, or {} when there is none."""
    from huggingface_hub import ModelCard

    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    try:
        block = ModelCard.load(readme).data.to_dict().get("loraflow")
    except Exception:  # a card without valid metadata is still a valid adapter
        return {}
    return block if isinstance(block, dict) else {}
