"""gradience.vnext.audit.lora_audit → gradience_lite, by renaming only."""
from gradience_lite import AdapterConfig as LoRAAdapterConfig  # noqa: F401
from gradience_lite import AuditResult as LoRAAuditResult  # noqa: F401
from gradience_lite import ModuleAudit as LoRALayerAudit  # noqa: F401
from gradience_lite import audit_lora_peft_dir, audit_lora_state_dict  # noqa: F401
from gradience_lite import module_type as infer_module_type  # noqa: F401
from gradience_lite import lowrank_singular_values as low_rank_singular_values  # noqa: F401
