"""The Hugging Face side of an adapter: its model card (and, with the Hub issue, push and pull)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from hub.base import BaseModel

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

A LoRA adapter for [{{ base_id }}](https://huggingface.co/{{ base_id }}), trained with the loraflow
`{{ trainer.name }}` trainer ({{ trainer.package }} {{ trainer.version }}).

## Lineage
{% if parent %}Continues from `{{ parent }}`.{% else %}Trained from the base model.{% endif %}

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

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{{ base_id }}"), "path/to/{{ name }}")
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
) -> ModelCard:
    base_id = base.hub_id if isinstance(base, BaseModel) else base["hub_id"]
    card_data = ModelCardData(
        base_model=base_id,
        library_name="peft",
        tags=["loraflow", "lora", trainer["name"]],
        model_name=name,
    )
    loss_curve = "loss_curve.png" if (Path(adapter_dir) / "loss_curve.png").is_file() else None
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        name=name,
        base_id=base_id,
        trainer=trainer,
        parent=parent,
        data_summary=data_summary,
        config=config,
        metrics={key: round(value, 4) if isinstance(value, float) else value for key, value in metrics.items()},
        loss_curve=loss_curve,
    )


def write_adapter_card(adapter_dir: Path, **details) -> Path:
    """Write README.md (the model card) into the adapter folder."""
    path = Path(adapter_dir) / "README.md"
    build_adapter_card(adapter_dir, **details).save(path)
    return path
